"""Measuring a codec: bytes, error and speed of one value codec on given features.

The features go through zarr with the cache's real chunking and byte codecs (into an
in-memory store), so the figures are what a cache of those items would store.  Used by
pipeline/bench_extract.py and the codec tests; the cache itself never calls it.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import zarr

from .codecs import get_codec, small_array_compressors, stored_to_torch
from .compact import fit_basis
from .layout import LevelSpec
from .storage import configure_zarr_threads

__all__ = ["measure_codec"]


def measure_codec(codec_name: str, features: list[np.ndarray], repeats: int = 3, options: dict | None = None,
                  bases: list | None = None) -> dict:
    """Size / error / speed of one codec on one or more items' features.

    ``features``: per level, float32 [C, h, w] (one item) or [B, C, h, w] (B items, all at
    their own full extent).  Written through zarr with the cache's real chunking and byte
    codecs into an in-memory store.  Returns bytes per item (features + int8 params, after
    compression), raw fp32 bytes per item, relative L2 error per level, and encode/decode
    throughput in MB/s of float32 values (single process, zarr + codec).  A basis codec
    (compact, with ``options`` such as its step) uses ``bases`` (one `LevelBasis` per level), or
    fits them on these same features when none are given (then the error is in-sample)."""
    configure_zarr_threads()
    codec = get_codec(codec_name, options)
    feats = [np.asarray(f, np.float32) for f in features]
    feats = [f[None] if f.ndim == 3 else f for f in feats]
    B = feats[0].shape[0]
    if any(f.shape[0] != B for f in feats):
        raise ValueError("every level needs the same number of items")
    if codec.needs_basis and bases is None:
        bases = [fit_basis(list(f), codec.step) for f in feats]
    bases = bases if codec.needs_basis else [None] * len(feats)
    specs = [LevelSpec(f"l{i}", f.shape[1], f.shape[2], f.shape[3], b.rank if b is not None else 0)
             for i, (f, b) in enumerate(zip(feats, bases))]
    group = zarr.open_group(zarr.storage.MemoryStore(), mode="w", zarr_format=3)
    raw = sum(f.nbytes for f in feats)
    arrays, params_arr = [], None
    for spec in specs:
        th, tw = spec.tile
        Hp, Wp = spec.padded
        arrays.append(group.create_array(
            spec.name, shape=(B, spec.stored, Hp, Wp), dtype=codec.stored_dtype,
            chunks=(1, spec.stored, th, tw), shards=(B, spec.stored, Hp, Wp),
            serializer=codec.serializer(), compressors=codec.compressors(), fill_value=0))
    if codec.has_params:
        T, P = sum(s.stored for s in specs), codec.params_per_channel
        params_arr = group.create_array("params", shape=(B, T, P), dtype="float32", chunks=(1, T, P),
                                        shards=(B, T, P), compressors=small_array_compressors())

    def write():
        prm_all = []
        for f, spec, arr, basis in zip(feats, specs, arrays, bases):
            Hp, Wp = spec.padded
            stored, prm = codec.encode(f, basis=basis)
            buf = np.zeros((B, spec.stored, Hp, Wp), codec.stored_dtype)
            buf[:, :, : f.shape[2], : f.shape[3]] = stored
            arr[:] = buf
            prm_all.append(prm)
        if params_arr is not None:
            params_arr[:] = np.concatenate(prm_all, axis=1)

    def read():
        prm = None if params_arr is None else params_arr[:]
        out, c0 = [], 0
        for f, arr, spec, basis in zip(feats, arrays, specs, bases):
            C = spec.stored
            st = arr[:, :, : f.shape[2], : f.shape[3]]
            p = None if prm is None else torch.from_numpy(np.ascontiguousarray(prm[:, c0:c0 + C]))
            out.append(codec.decode(stored_to_torch(st), p, basis=basis))
            c0 += C
        return out

    t_enc = min(_timed(write)[0] for _ in range(repeats))
    t_dec, decoded = min((_timed(read) for _ in range(repeats)), key=lambda x: x[0])
    nbytes = sum(int(a.nbytes_stored()) for a in arrays)
    nbytes += int(params_arr.nbytes_stored()) if params_arr is not None else 0
    errs = {}
    for spec, f, d in zip(specs, feats, decoded):
        ref = torch.from_numpy(f).double()
        errs[spec.name] = float(torch.linalg.vector_norm(d.double() - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30))
    return {
        "codec": codec_name,
        "options": codec.options(),
        "basis_ranks": [b.rank for b in bases] if codec.needs_basis else None,
        "side_data_bytes": sum(b.to_array().nbytes for b in bases) if codec.needs_basis else 0,
        "items": B,
        "bytes_per_item": nbytes / B,
        "fp32_bytes_per_item": raw / B,
        "ratio_vs_fp32": nbytes / raw,
        "rel_l2_error": errs,
        "max_rel_l2_error": max(errs.values()),
        "encode_MBps": raw / t_enc / 1e6,
        "decode_MBps": raw / t_dec / 1e6,
    }


def _timed(fn):
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    r = fn()
    return time.perf_counter() - t0, r
