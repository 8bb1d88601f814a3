"""Feature codecs for the teacher cache.

Two layers, kept apart (like zarr-python v3 separates array->array, array->bytes and
bytes->bytes codecs):

1. A *value* codec (``FeatureCodec``): float32 features -> a stored dtype (+ optional
   per-(item, channel) parameters), and back to float32 torch tensors on read.  One class
   per transformation, registered in ``CODECS``.
2. *Byte* codecs applied by zarr to every inner chunk: a compressor followed by a crc32c
   checksum (``zarr.codecs.Crc32cCodec``) so a flipped bit on disk raises on read instead of
   silently training on garbage (invariant 6).

Compressor choice (measured on this 2-core machine, 64x64 tiles of smooth synthetic FPN-like
fields, 64 channels; ratio = compressed/raw, decode speed per core):

    stored  zstd-3            blosc-lz4 + bitshuffle    blosc-lz4 + byte shuffle
    fp32    0.925  0.71 GB/s  0.848  1.8 GB/s           0.861  2.2 GB/s
    fp16    0.920  0.73 GB/s  0.880  2.0 GB/s           0.958  2.2 GB/s
    bf16    0.762  0.61 GB/s  0.696  2.3 GB/s           0.722  1.7 GB/s
    uint8   0.869  0.58 GB/s  0.956  1.6 GB/s           1.000  (no gain)
    (zstd-1 on uint8: 0.886, encode 5x faster than zstd-3: 0.54 vs 0.11 GB/s)

For float codecs blosc-lz4 with bitshuffle is both smaller than zstd-3 (bitshuffle groups
the slowly varying sign/exponent bits) and ~3x faster to decode, and decode speed is what
decides whether cached training is I/O bound (~1 GB/s decoded per GPU, docs/design.md, Storage physics).  For
int8 the bytes are already dense; only entropy coding helps, so plain zstd is used, at
level 1: within 2% of level 3 in size but 5x faster to encode (the extractor would
otherwise spend ~0.2 s/COCO image compressing).  Re-measure on real teacher features.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np
import torch
import warnings

from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from . import compact

__all__ = [
    "FeatureCodec",
    "Float32Codec",
    "Float16Codec",
    "BFloat16Codec",
    "Int8AffineCodec",
    "CompactCodec",
    "CODECS",
    "get_codec",
    "stored_to_torch",
    "small_array_compressors",
]


def _check_batch(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim < 3:
        raise ValueError(f"features must be [..., C, H, W], got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


@dataclass(frozen=True)
class FeatureCodec:
    """Base class: float32 [..., C, H, W] <-> stored array (+ params [..., C, P]).

    ``encode`` works on numpy (the writer side), ``decode`` on torch (the reader side).
    CPU tensors are decoded through numpy: on these machines torch's elementwise dtype
    conversions ran 10-40x slower than numpy's whenever torch used >1 intra-op thread.
    """

    name: ClassVar[str]
    stored_dtype: ClassVar[np.dtype]
    lossless: ClassVar[bool] = False
    #: number of float32 params per channel (0 = no params array)
    params_per_channel: ClassVar[int] = 0
    #: largest |value| the stored dtype represents (writer refuses larger: it would be inf)
    max_abs: ClassVar[float] = float(np.finfo(np.float32).max)
    #: whether the codec stores levels in a per-cache basis (`compact.LevelBasis`, side data
    #: fitted before the first shard); then the stored channel count is the basis rank
    needs_basis: ClassVar[bool] = False
    #: dtype of the RoI classification logits: float32 keeps them inside the `rois` array
    logits_dtype: ClassVar[str] = "float32"
    #: boxes are rounded to multiples of this many pixels before storing (None: exact float32)
    box_quantum: ClassVar[float | None] = None

    @property
    def has_params(self) -> bool:
        return self.params_per_channel > 0

    def options(self) -> dict:
        """The codec's settings, recorded in the layout (`codec_options`)."""
        return {}

    def encode(
        self, x: np.ndarray, extents: Sequence[tuple[int, int]] | None = None, basis=None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """x: float32 [B, C, H, W] (or [C, H, W]).  ``extents`` (per batch item (h, w)) tells
        codecs that compute statistics which part is the item's own data; by default all.
        ``basis``: the level's `compact.LevelBasis` for codecs that need one."""
        raise NotImplementedError

    def decode(self, stored: torch.Tensor, params: torch.Tensor | None = None, basis=None) -> torch.Tensor:
        raise NotImplementedError

    def serializer(self):
        """zarr array->bytes codec of every inner chunk ("auto": zarr's plain bytes)."""
        return "auto"

    def stored_finite(self, stored: np.ndarray) -> bool:
        """True iff every stored value decodes to a finite float (e.g. fp16 overflow -> inf)."""
        return True

    def compressors(self) -> list:
        """zarr bytes->bytes codecs for every inner chunk: compressor, then crc32c."""
        return [
            BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=self.stored_dtype.itemsize),
            Crc32cCodec(),
        ]

    def describe_compressors(self) -> list[dict]:
        return [c.to_dict() for c in self.compressors()]


@dataclass(frozen=True)
class Float32Codec(FeatureCodec):
    name: ClassVar[str] = "fp32"
    stored_dtype: ClassVar[np.dtype] = np.dtype(np.float32)
    lossless: ClassVar[bool] = True

    def encode(self, x, extents=None, basis=None):
        return _check_batch(x), None

    def decode(self, stored, params=None, basis=None):
        return stored.to(torch.float32)


@dataclass(frozen=True)
class Float16Codec(FeatureCodec):
    name: ClassVar[str] = "fp16"
    stored_dtype: ClassVar[np.dtype] = np.dtype(np.float16)
    max_abs: ClassVar[float] = float(np.finfo(np.float16).max)

    def encode(self, x, extents=None, basis=None):
        return _check_batch(x).astype(np.float16), None

    def decode(self, stored, params=None, basis=None):
        if stored.device.type == "cpu":
            return torch.from_numpy(stored.numpy().astype(np.float32))
        return stored.to(torch.float32)

    def stored_finite(self, stored):
        return bool(np.isfinite(stored).all())


@dataclass(frozen=True)
class BFloat16Codec(FeatureCodec):
    """bfloat16 is not a zarr dtype: the bits are stored as uint16 and viewed in torch."""

    name: ClassVar[str] = "bf16"
    stored_dtype: ClassVar[np.dtype] = np.dtype(np.uint16)
    max_abs: ClassVar[float] = 3.38e38  # bf16 max is 3.3895e38; above it rounds to inf

    def encode(self, x, extents=None, basis=None):
        # float32 -> bfloat16 bits, round-to-nearest-even (same as torch's .to(bfloat16)).
        bits = _check_batch(x).view(np.uint32)
        bits = bits + (((bits >> 16) & 1) + np.uint32(0x7FFF))
        return (bits >> 16).astype(np.uint16), None

    def decode(self, stored, params=None, basis=None):
        if stored.dtype == torch.uint16:
            stored = stored.view(torch.int16)
        if stored.device.type == "cpu":
            bits = stored.numpy().view(np.uint16).astype(np.uint32) << 16
            return torch.from_numpy(bits.view(np.float32))
        return stored.view(torch.bfloat16).to(torch.float32)

    def stored_finite(self, stored):
        # exponent all ones = inf/nan (float32 values near max round up to inf)
        return bool(((np.asarray(stored) & 0x7F80) != 0x7F80).all())


@dataclass(frozen=True)
class Int8AffineCodec(FeatureCodec):
    """uint8 with a per-(item, channel) affine map: x ~= q * scale + min.

    min/max come from the item's own extent only (not the zero padding); q is
    round-to-nearest.  params[..., c, :] = [min, scale] (float32).  Stored values outside
    the extent are 0 so fully padded tiles stay fill and are never written.
    """

    name: ClassVar[str] = "int8"
    stored_dtype: ClassVar[np.dtype] = np.dtype(np.uint8)
    params_per_channel: ClassVar[int] = 2
    levels: ClassVar[int] = 255

    def encode(self, x, extents=None, basis=None):
        x = _check_batch(x)
        squeeze = x.ndim == 3
        if squeeze:
            x = x[None]
            extents = None if extents is None else [extents] if np.ndim(extents) == 1 else extents
        B, C, H, W = x.shape
        if extents is None:
            extents = [(H, W)] * B
        if len(extents) != B:
            raise ValueError(f"{len(extents)} extents for a batch of {B}")
        q = np.zeros(x.shape, dtype=np.uint8)
        params = np.zeros((B, C, 2), dtype=np.float32)
        for b, (h, w) in enumerate(extents):
            own = x[b, :, :h, :w]
            if own.size == 0:
                continue
            mn = own.min(axis=(1, 2))
            mx = own.max(axis=(1, 2))
            scale = ((mx.astype(np.float64) - mn) / self.levels).astype(np.float32)
            safe = np.where(scale > 0, scale, np.float32(1.0))
            qb = np.rint((own - mn[:, None, None]) / safe[:, None, None])
            q[b, :, :h, :w] = np.clip(qb, 0, self.levels).astype(np.uint8)
            params[b, :, 0] = mn
            params[b, :, 1] = scale
        if squeeze:
            return q[0], params[0]
        return q, params

    def decode(self, stored, params=None, basis=None):
        if params is None:
            raise ValueError("int8 codec needs its [min, scale] params to decode")
        params = params.to(torch.float32)
        if stored.device.type == "cpu" and params.device.type == "cpu":
            p = params.numpy()
            out = np.multiply(stored.numpy(), p[..., 1][..., None, None], dtype=np.float32)
            out += p[..., 0][..., None, None]
            return torch.from_numpy(out)
        mn = params[..., 0][..., None, None]
        scale = params[..., 1][..., None, None]
        return torch.addcmul(mn, stored.to(torch.float32), scale)

    def compressors(self) -> list:
        return [ZstdCodec(level=1), Crc32cCodec()]


@dataclass(frozen=True)
class CompactCodec(FeatureCodec):
    """Per-level PCA basis + one quantisation step per (item, level); see compact.py.

    Stored: int16 codes [r, h, w] per level (r = the basis rank), entropy-coded by pcodec, and
    per component its float32 step (params).  Measured on the quickstart teacher's codes, pcodec
    reached their 0-order entropy and was ~20% smaller than zstd-3 (docs/benchmarks.md).
    The RoI logits are stored as float16 and the boxes rounded to 1/16 px: once features are
    small, float32 RoI arrays would be the largest part of an item.
    """

    name: ClassVar[str] = "compact"
    stored_dtype: ClassVar[np.dtype] = np.dtype(np.int16)
    params_per_channel: ClassVar[int] = 1
    needs_basis: ClassVar[bool] = True
    logits_dtype: ClassVar[str] = "float16"
    # 1/16 px is far below what RoIAlign resolves, and the rounded float32 values compress to
    # about half (measured on the quickstart teacher's proposals: 5.4 -> 3.0 kB per view)
    box_quantum: ClassVar[float | None] = 1 / 16
    #: quantisation step in units of each (item, level)'s rms; larger = smaller cache, larger error
    step: float = compact.DEFAULT_STEP

    def __post_init__(self):
        if not (isinstance(self.step, (int, float)) and 0 < float(self.step) <= 64):
            raise ValueError(f"compact codec step {self.step!r}: must be a number in (0, 64]")

    def options(self) -> dict:
        return {"step": float(self.step)}

    def encode(self, x, extents=None, basis=None):
        if basis is None:
            raise ValueError("compact codec needs the level's basis to encode")
        x = _check_batch(x)
        squeeze = x.ndim == 3
        x = x[None] if squeeze else x
        B, _, H, W = x.shape
        extents = [(H, W)] * B if extents is None else ([extents] if np.ndim(extents) == 1 else extents)
        codes = np.zeros((B, basis.rank, H, W), np.int16)
        steps = np.zeros((B, basis.rank, 1), np.float32)
        for b, (h, w) in enumerate(extents):
            c, st = compact.encode_level(torch.from_numpy(x[b, :, :h, :w]), basis, float(self.step))
            codes[b, :, :h, :w] = c.numpy()
            steps[b, :, 0] = st.numpy()
        return (codes[0], steps[0]) if squeeze else (codes, steps)

    def decode(self, stored, params=None, basis=None):
        if params is None or basis is None:
            raise ValueError("compact codec needs its steps (params) and the level's basis to decode")
        return compact.decode_level(stored, params[..., 0], basis)

    def serializer(self):
        from zarr.codecs.numcodecs import PCodec
        return PCodec(level=8)

    def compressors(self) -> list:
        return [Crc32cCodec()]

    def describe_compressors(self) -> list[dict]:
        return [self.serializer().to_dict()] + [c.to_dict() for c in self.compressors()]


# pcodec is a numcodecs codec, outside the zarr v3 core spec: zarr-python reads it (it is recorded
# in every array's metadata), zarr warns once per array that other implementations may not.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")


CODECS: dict[str, FeatureCodec] = {
    c.name: c for c in (Float32Codec(), Float16Codec(), BFloat16Codec(), Int8AffineCodec(), CompactCodec())
}


def get_codec(name: str, options: dict | None = None) -> FeatureCodec:
    """The codec called `name`, with the settings a layout records (`codec_options`)."""
    try:
        codec = CODECS[name]
    except KeyError:
        raise ValueError(f"unknown feature codec {name!r}; choose one of {sorted(CODECS)}") from None
    if options:
        try:
            codec = type(codec)(**options)
        except TypeError as e:
            raise ValueError(f"codec {name}: bad options {options} ({e})") from None
    return codec


def stored_to_torch(stored: np.ndarray) -> torch.Tensor:
    """numpy stored array -> torch tensor (uint16 goes through int16: torch's uint16 support is thin)."""
    stored = np.ascontiguousarray(stored)
    if stored.dtype == np.uint16:
        stored = stored.view(np.int16)
    return torch.from_numpy(stored)


def small_array_compressors() -> list:
    """For the small per-item arrays (rois, meta, params): zstd + crc32c."""
    return [ZstdCodec(level=1), Crc32cCodec()]
