#!/usr/bin/env python
"""Does the compact codec gain from a finer quantisation step on GT-object cells, at equal size?

DeFeat weights an object cell alpha_obj / N_obj and a background cell alpha_bg / N_bg. This
reads teacher features from an existing cache (e.g. the quickstart's fp16 cache), fits the
compact bases on `--fit` items, and encodes `--items` other items with background step
`q x rms` and object step `q x rms / k` (object cells from the GT mask of the view's boxes, the
distiller's level assignment), for several q and k. It reports the pcodec bytes of the codes
and the DeFeat-weighted squared error of the targets, alpha_obj * mean_obj e^2 + alpha_bg *
mean_bg e^2 (the neck loss's shift for a student equal to the teacher), so k can be compared
at equal bytes. Prints one JSON object (last stdout line).

usage: python pipeline/bench_region_steps.py CACHE DATA.toml [--fit 48] [--items 48] [--json out.json]
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import command_line, emit, log  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cache")
    ap.add_argument("data")
    ap.add_argument("--fit", type=int, default=48)
    ap.add_argument("--items", type=int, default=48)
    ap.add_argument("--steps", default="1.6,2.0,2.4,2.8")
    ap.add_argument("--ratios", default="1,1.5,2,3")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch
    from numcodecs import PCodec
    from defeat_cache.cache import TeacherCache
    from defeat_cache.cache.compact import BasisFitter
    from defeat_cache.data.dataset import ViewDataset, load_dataset
    from defeat_cache.distill.distiller import PAPER_MIN_SIZE
    from defeat_cache.distill.masks import FINEST_SCALE, build_level_masks
    from defeat_cache.models.zoo import load_model_spec
    from defeat_cache.views import Preprocessing, ViewSet
    cache = TeacherCache(args.cache)
    prov = cache.provenance()
    spec = load_model_spec(prov["teacher"]["name"])
    pre = Preprocessing.from_dict(prov["preprocessing"])
    data = load_dataset(args.data, prov["dataset"]["split"])
    vds = ViewDataset(data, pre, ViewSet(tuple(prov["views"])))
    order = random.Random(0).sample(range(len(cache)), args.fit + args.items)
    fit_items, test_items = order[:args.fit], order[args.fit:]
    L = len(cache.layout.feature_levels)
    fitters = [BasisFitter(lv.channels) for lv in cache.layout.feature_levels]
    for i in fit_items:
        for f, x in zip(fitters, cache.read(i).features):
            f.add(x)
    bases = [f.fit(2.0) for f in fitters]
    finest = FINEST_SCALE * pre.min_size / PAPER_MIN_SIZE
    test = []
    for i in test_items:
        it = cache.read(i)
        boxes = vds.sample(it.image_index, it.view_index)["boxes"]
        masks = build_level_masks("gt", [boxes], [tuple(f.shape[-2:]) for f in it.features], spec.strides[:L],
                                  finest_scale=finest)
        test.append((it.features, [m[0].reshape(-1) > 0 for m in masks]))
    log(f"bases fitted on {len(fit_items)} items; {len(test)} items encoded per setting")
    pc = PCodec(level=8)
    rows = []
    for k in (float(v) for v in args.ratios.split(",")):
        for q in (float(v) for v in args.steps.split(",")):
            nbytes, e_obj, e_bg, n_obj, n_bg = 0, 0.0, 0.0, 0, 0
            for feats, masks in test:
                for x, obj, b in zip(feats, masks, bases):
                    C, h, w = x.shape
                    xc = x.reshape(C, -1) - b.mean[:, None]
                    coef = b.components @ xc
                    step = torch.full((h * w,), q * float(xc.pow(2).mean().sqrt()))
                    step[obj] /= k
                    codes = torch.round(coef / step).to(torch.int16)
                    y = b.components.T @ (codes.float() * step) + b.mean[:, None]
                    nbytes += len(pc.encode(codes.numpy()))
                    e = (y - x.reshape(C, -1)).pow(2).sum(0)
                    e_obj, n_obj = e_obj + float(e[obj].sum()), n_obj + int(obj.sum()) * C
                    e_bg, n_bg = e_bg + float(e[~obj].sum()), n_bg + int((~obj).sum()) * C
            err = 4.0 * e_obj / max(n_obj, 1) + 16.0 * e_bg / max(n_bg, 1)
            rows.append({"object_step_divisor": k, "step": q, "bytes": nbytes, "weighted_error": round(err, 4)})
            log(f"k={k} q={q}: {nbytes} bytes, weighted error {err:.4f}")
    # each k's weighted error at the bytes of k=1, q=2 (linear interpolation between its steps)
    ref = next(r for r in rows if r["object_step_divisor"] == 1.0 and r["step"] == 2.0)
    at_equal = {}
    for k in sorted({r["object_step_divisor"] for r in rows}):
        pts = sorted(((r["bytes"], r["weighted_error"]) for r in rows if r["object_step_divisor"] == k))
        for (b0, e0), (b1, e1) in zip(pts, pts[1:]):
            if b0 <= ref["bytes"] <= b1:
                at_equal[str(k)] = round(e0 + (e1 - e0) * (ref["bytes"] - b0) / (b1 - b0), 4)
    result = {"benchmark": "region_steps", "command": command_line(), "fit_items": len(fit_items),
              "items": len(test), "rows": rows, "reference": ref, "weighted_error_at_reference_bytes": at_equal}
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
