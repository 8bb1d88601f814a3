"""bench_extract.py's codec measurements on real teacher features: bytes, error and speed per
codec, in a real cache with the extracted layout and at the features' own extent, and the
extrapolation of those bytes to COCO.  Not a script (see bench_extract.py).
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

CODEC_NAMES = ("fp32", "fp16", "bf16", "int8", "compact:1", "compact", "compact:3")


def parse_codec(text: str) -> tuple[str, dict | None]:
    """"compact:3" -> ("compact", {"step": 3.0}); other names have no options."""
    name, _, step = text.partition(":")
    return name, ({"step": float(step)} if step else None)


def fit_bench_bases(layout, outs: list, step: float) -> dict:
    """The bases extraction would fit: on `basis_sample` of these items' teacher outputs."""
    from defeat_cache.cache.extract import DEFAULT_BASIS_ITEMS, bases_of_outputs, basis_sample
    return bases_of_outputs(layout, (outs[i] for i in basis_sample(len(outs), DEFAULT_BASIS_ITEMS)), step)


def kd_fidelity(samples: list[dict], outs: list, decoded: list, strides: list[int], finest_scale: float,
                num_items: int = 32, seed: int = 0) -> dict:
    """The error of what training uses, compressed vs fp32 teacher targets: the DeFeat neck terms
    (GT masks, alpha_obj 4 / alpha_bg 16) and their gradient with respect to the (adapted) student
    features, for a student at the start (adapted features ~0, the 1e-4 adapter init) and half
    way (the fp32 teacher plus noise of half its rms); and the RoI KD terms (T_obj 3 / T_bg 1) on
    the teacher's proposals with student logits = fp32 teacher logits plus unit noise.
    Relative error of each loss term, relative L2 error and cosine of the gradient."""
    import torch
    from defeat_cache.distill.losses import cls_kd_terms, neck_distill_loss
    from defeat_cache.distill.masks import build_level_masks
    g = torch.Generator().manual_seed(seed)
    idx = list(range(min(num_items, len(outs))))
    res: dict = {}
    for state in ("start", "half_way"):
        loss_err, grad_err, cosines = {"loss_neck_obj": [], "loss_neck_bg": []}, [], []
        for i in idx:
            ref = [f.cpu().float()[None] for f in outs[i].features]
            got = [f.float()[None] for f in decoded[i].features]
            masks = build_level_masks("gt", [samples[i]["boxes"]], [tuple(f.shape[-2:]) for f in ref], strides,
                                      finest_scale=finest_scale)
            valids = [torch.ones(f.shape[0], *f.shape[-2:]) for f in ref]
            if state == "start":
                stud = [torch.randn(f.shape, generator=g) * 1e-4 for f in ref]
            else:
                stud = [f + 0.5 * f.pow(2).mean().sqrt() * torch.randn(f.shape, generator=g) for f in ref]
            grads = []
            for targets in (ref, got):
                s = [x.clone().requires_grad_(True) for x in stud]
                terms = neck_distill_loss(s, targets, masks, valids, 4.0, 16.0)
                (terms["loss_neck_obj"] + terms["loss_neck_bg"]).backward()
                grads.append((torch.cat([x.grad.flatten() for x in s]), {k: float(v.detach()) for k, v in terms.items()}))
            (g_ref, t_ref), (g_got, t_got) = grads
            for k in loss_err:
                if t_ref[k] > 0:
                    loss_err[k].append(abs(t_got[k] - t_ref[k]) / t_ref[k])
            grad_err.append(float((g_got - g_ref).norm() / g_ref.norm().clamp_min(1e-30)))
            cosines.append(float(torch.nn.functional.cosine_similarity(g_got, g_ref, dim=0)))
        res[f"neck_{state}"] = {
            **{f"{k}_rel_err_mean": round(sum(v) / max(len(v), 1), 5) for k, v in loss_err.items()},
            "grad_rel_l2_mean": round(sum(grad_err) / len(grad_err), 5),
            "grad_cosine_min": round(min(cosines), 5), "grad_cosine_mean": round(sum(cosines) / len(cosines), 5)}
    errs = []
    for i in idx:
        zt = torch.cat([outs[i].proposal_logits, outs[i].gt_logits]).cpu().float()
        if not zt.numel():
            continue
        zc = torch.cat([decoded[i].proposal_logits, decoded[i].gt_logits]).float()
        zs = zt + torch.randn(zt.shape, generator=g)
        pos = torch.zeros(len(zt), dtype=torch.bool)
        pos[len(outs[i].proposal_logits):] = True  # the GT rows as positives, the proposals as negatives
        a, b = cls_kd_terms(zs, zt, pos, 1.0, 1.0, 3.0, 1.0), cls_kd_terms(zs, zc, pos, 1.0, 1.0, 3.0, 1.0)
        errs += [abs(float(b[k] - a[k])) / max(float(a[k]), 1e-30) for k in a]
    if errs:
        res["roi_cls_kd_terms_rel_err_max"] = float(f"{max(errs):.3g}")
    return res

COCO_TRAIN_IMAGES = 118287
COCO_CANVAS = (800, 1216)  # average padded canvas at shorter side 800, max 1333
COCO_STRIDES = (4, 8, 16, 32, 64)  # P2..P6
COCO_CHANNELS = 256


def coco_level_shapes() -> list[tuple[int, int]]:
    h, w = COCO_CANVAS
    return [(math.ceil(h / s), math.ceil(w / s)) for s in COCO_STRIDES]


def _max_abs_diff(a, b) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max()) if a.numel() else 0.0


def real_layout_codecs(template_cache: str, samples: list[dict], outs: list, codecs, work: Path,
                       level_names: list[str], strides: list[int] | None = None,
                       finest_scale: float | None = None) -> dict:
    """Writes the bare forward's outputs into one real cache per codec (the extracted cache's
    layout and provenance, codec swapped, CacheWriter.write_shard as extract does), then reads
    every item back with TeacherCache.read.  Gives the bytes the cache really stores per view
    (edge tiles zero-padded to the layout's max extent included) and the end-to-end error."""
    import torch
    from defeat_cache.cache import CacheLayout, CacheWriter, TeacherCache
    from defeat_cache.cache.extract import cache_record
    src = TeacherCache(template_cache)
    prov = src.provenance()
    res = {}
    extracted_codec = src.layout.codec
    from defeat_cache.cache.codecs import get_codec
    for label in codecs:
        name, options = parse_codec(label)
        codec = get_codec(name, options)
        base = {k: v for k, v in src.layout.to_dict().items()}
        for key in ("feature_levels", "backbone_levels"):  # the template's ranks (if any) are not ours
            base[key] = [{**lv, "stored_channels": 0} for lv in base[key]]
        layout = CacheLayout.from_dict({**base, "codec": name, "codec_options": codec.options(),
                                        "logits_dtype": codec.logits_dtype})
        path = work / f"cache_{label.replace(':', '_')}_rewrite.zarr"
        if path.exists():
            shutil.rmtree(path)
        t0 = time.perf_counter()
        fit = (lambda: fit_bench_bases(layout, outs, codec.step)) if codec.needs_basis else None
        writer = CacheWriter.create_or_resume(str(path), prov, layout, create=True, fit_bases=fit)
        t_fit = time.perf_counter() - t0
        t_write = 0.0
        for s in range(layout.num_shards):
            items = [cache_record(samples[i], outs[i]) for i in writer.shard_items(s)]
            t0 = time.perf_counter()
            writer.write_shard(s, items)
            t_write += time.perf_counter() - t0
        writer.mark_complete()
        cache = TeacherCache(str(path))
        ins = cache.inspect()
        err_sq = [0.0] * len(level_names)
        ref_sq = [0.0] * len(level_names)
        raw = 0
        t_read = 0.0
        feat_diff, same_props = 0.0, 0
        decoded = []
        for i in range(len(cache)):
            t0 = time.perf_counter()
            item = cache.read(i)
            t_read += time.perf_counter() - t0
            decoded.append(item)
            if name == extracted_codec:  # the extracted cache should hold the same values (up to float noise)
                ext = src.read(i)
                feat_diff = max([feat_diff] + [_max_abs_diff(a, b) for a, b in zip(item.features, ext.features)])
                same_props += int(_max_abs_diff(item.proposals, ext.proposals) <= 1e-3)
            for li, (got, ref) in enumerate(zip(item.features, outs[i].features)):
                ref = ref.cpu().double()
                err_sq[li] += float(torch.sum((got.double() - ref) ** 2))
                ref_sq[li] += float(torch.sum(ref ** 2))
                raw += ref.numel() * 4
        n = len(cache)
        own_values = tiled_values = 0
        for o in outs:
            for f, spec in zip(o.features, layout.feature_levels):
                C, h, w = f.shape
                th, tw = spec.tile
                own_values += C * h * w
                tiled_values += C * math.ceil(h / th) * th * math.ceil(w / tw) * tw
        params = (ins["arrays"].get("params") or {}).get("bytes_per_item") or 0.0
        kinds = ins.get("bytes_per_item_by_kind") or {}
        res[label] = {
            "options": codec.options(),
            "roi_arrays_bytes_per_view": round(kinds.get("roi_arrays", 0.0), 1),
            "side_data_bytes_per_view": round(kinds.get("side_data", 0.0), 1),
            "side_data_bytes": round(kinds.get("side_data", 0.0) * n, 1),
            "ranks": {k: v["stored_channels"] for k, v in ins["levels"].items()},
            "explained_energy": {k: v.get("explained_energy") for k, v in ins["levels"].items()
                                 if v.get("explained_energy") is not None} or None,
            "basis_fit_s": round(t_fit, 2),
            "bytes_per_view": round(ins["feature_bytes_per_item"] + params, 1),
            "feature_bytes_per_view": round(ins["feature_bytes_per_item"], 1),
            "params_bytes_per_view": round(params, 1),
            "all_arrays_bytes_per_view": round(ins["bytes_per_item"], 1),
            "rel_l2": float(f"{math.sqrt(sum(err_sq) / max(sum(ref_sq), 1e-300)):.4g}"),
            "rel_l2_per_level": {lv: float(f"{math.sqrt(e / max(r, 1e-300)):.4g}")
                                 for lv, e, r in zip(level_names, err_sq, ref_sq)},
            "write_MBps": round(raw / t_write / 1e6, 1),
            "read_MBps": round(raw / t_read / 1e6, 1),
            "read_items_per_s": round(n / t_read, 1),
            "tiled_over_own_values": round(tiled_values / own_values, 4),
        }
        if strides is not None:
            res[label]["kd_fidelity"] = kd_fidelity(samples, outs, decoded, strides, finest_scale)
        if name == extracted_codec:
            res[label]["vs_extracted_cache"] = {"features_max_abs_diff": feat_diff,
                                               "items_with_same_proposals": f"{same_props}/{n}"}
        shutil.rmtree(path, ignore_errors=True)
    return res


def measure_codecs(features: list[list], codecs, repeats: int, level_names: list[str]) -> dict:
    """measure_codec per group of items that share level shapes, aggregated exactly:
    bytes and times are summed, relative L2 errors recombined from per-group norms."""
    import numpy as np
    import zarr
    from defeat_cache.cache.codecs import get_codec, small_array_compressors
    from defeat_cache.cache.codec_bench import measure_codec

    groups: dict[tuple, list[int]] = {}
    for i, fs in enumerate(features):
        groups.setdefault(tuple(tuple(f.shape) for f in fs), []).append(i)
    stacked = []
    for shapes, idx in groups.items():
        levels = [np.stack([features[i][li].numpy() for i in idx]).astype(np.float32) for li in range(len(shapes))]
        norms = [float(np.linalg.norm(lv.astype(np.float64).ravel())) for lv in levels]
        stacked.append((idx, levels, norms))
    values_per_item = sum(f.numel() for fs in features for f in fs) / len(features)
    out = {}
    for label in codecs:
        name, options = parse_codec(label)
        codec = get_codec(name, options)
        t_enc = t_dec = 0.0
        feat_bytes = params_bytes = raw = 0.0
        err_sq = [0.0] * len(level_names)
        ref_sq = [0.0] * len(level_names)
        for idx, levels, norms in stacked:
            # a basis codec: bases fitted once on all measured items, as extraction does
            bases = None
            if codec.needs_basis:
                from defeat_cache.cache.compact import fit_basis
                bases = [fit_basis([f[li] for f in features], codec.step) for li in range(len(levels))]
            r = measure_codec(name, levels, repeats=repeats, options=options, bases=bases)
            B = len(idx)
            group_raw = r["fp32_bytes_per_item"] * B
            raw += group_raw
            t_enc += group_raw / (r["encode_MBps"] * 1e6)
            t_dec += group_raw / (r["decode_MBps"] * 1e6)
            total = r["bytes_per_item"] * B
            pb = 0.0
            if codec.has_params:  # size the params array alone, as the cache stores it
                prm = np.concatenate([codec.encode(lv, basis=None if bases is None else bases[li])[1]
                                      for li, lv in enumerate(levels)], axis=1)
                T = prm.shape[1]
                arr = zarr.open_group(zarr.storage.MemoryStore(), mode="w", zarr_format=3).create_array(
                    "params", shape=prm.shape, dtype="float32", chunks=(1, T, prm.shape[2]),
                    shards=prm.shape, compressors=small_array_compressors())
                arr[:] = prm
                pb = float(arr.nbytes_stored())
            params_bytes += pb
            feat_bytes += total - pb
            for li, key in enumerate(sorted(r["rel_l2_error"], key=lambda k: int(k[1:]))):
                err_sq[li] += (r["rel_l2_error"][key] * norms[li]) ** 2
                ref_sq[li] += norms[li] ** 2
        n = len(features)
        per_level = {lv: math.sqrt(e / max(s, 1e-300)) for lv, e, s in zip(level_names, err_sq, ref_sq)}
        out[label] = {
            "bytes_per_view": round((feat_bytes + params_bytes) / n, 1),
            "params_bytes_per_view": round(params_bytes / n, 1),
            "feature_bytes_per_value": round(feat_bytes / n / values_per_item, 4),
            "rel_l2": float(f"{math.sqrt(sum(err_sq) / max(sum(ref_sq), 1e-300)):.4g}"),
            "rel_l2_per_level": {k: float(f"{v:.4g}") for k, v in per_level.items()},
            "encode_MBps": round(raw / t_enc / 1e6, 1),
            "decode_MBps": round(raw / t_dec / 1e6, 1),
        }
    return {"items": len(features), "values_per_view": int(values_per_item), "groups": len(groups),
            "repeats": repeats, "by_codec": out}


def coco_extrapolation(codecs: dict, views: int) -> dict:
    """COCO bytes per image view from each codec's measured bytes per value.

    lower: the features' own extent only (measure_codec: what the values themselves compress to).
    tiled_upper: every inner tile that overlaps the image stored in full, its zero padding
    costing as much as data (the cache pads items to the layout's max extent and stores every
    tile touching the image; COCO holds both orientations, so max canvas 1344x1344, tiles
    min(64, max extent)).  estimate: zero padding at the relative cost measured on this
    benchmark's own data (`zero_padding_cost_here`)."""
    shapes = coco_level_shapes()
    values = COCO_CHANNELS * sum(h * w for h, w in shapes)
    max_canvas = (1344, 1344)
    covered = 0
    for (h, w), s in zip(shapes, COCO_STRIDES):
        th, tw = min(64, math.ceil(max_canvas[0] / s)), min(64, math.ceil(max_canvas[1] / s))
        covered += math.ceil(h / th) * th * math.ceil(w / tw) * tw
    tiled_values = COCO_CHANNELS * covered
    out = {"model": "r152_fpn", "canvas_hw": list(COCO_CANVAS), "channels": COCO_CHANNELS,
           "levels": {f"p{i + 2}": list(hw) for i, hw in enumerate(shapes)},
           "values_per_view": values, "tiled_values_per_view": tiled_values, "images": COCO_TRAIN_IMAGES,
           "method": "each codec's feature bytes/value measured on THIS teacher's features (own extent, "
                     "measure_codec) x COCO values per view (+ int8 params: 256 ch x 5 levels x 2 float32); "
                     "tiled_upper also counts the zero padding of edge tiles at full cost; estimate counts it "
                     "at the zero_padding_cost measured here (stored bytes of a padded value / a data value). CPU-scale "
                     "features may compress differently from r152 COCO features: re-measure there.",
           "by_codec": {}}
    for name, c in codecs.items():
        per_value = c["own_extent_feature_bytes_per_value"]
        params = COCO_CHANNELS * len(shapes) * 2 * 4 if c.get("params_bytes_per_view") else 0
        lo = values * per_value + params
        hi = tiled_values * per_value + params
        zc = min(max(c.get("zero_padding_cost") or 0.0, 0.0), 1.0)
        mid = values * per_value * (1 + zc * (tiled_values / values - 1)) + params
        out["by_codec"][name] = {
            "bytes_per_value": per_value,
            "MB_per_image_view": round(lo / 1e6, 2), "TB_per_view": round(lo * COCO_TRAIN_IMAGES / 1e12, 3),
            f"TB_{views}_views": round(lo * COCO_TRAIN_IMAGES * views / 1e12, 3),
            "MB_per_image_view_estimate": round(mid / 1e6, 2),
            "TB_per_view_estimate": round(mid * COCO_TRAIN_IMAGES / 1e12, 3),
            "MB_per_image_view_tiled_upper": round(hi / 1e6, 2),
            "TB_per_view_tiled_upper": round(hi * COCO_TRAIN_IMAGES / 1e12, 3),
            "zero_padding_cost_here": c.get("zero_padding_cost"),
        }
    return out
