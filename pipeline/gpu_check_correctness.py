"""The correctness steps of pipeline/gpu_check.py (small models, seconds each on a GPU).

Each step returns its figures and a `Checks` of the bounds it holds the figures to; the bounds
are module constants, stated once here and shown in every step's JSON line.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from gpu_check_setup import Checks, Setup, rel_l2, write_json

REPO = Path(__file__).resolve().parents[1]

# cache == online (one DeFeat step, the same weights and samples; fp32 cache extracted one image
# a batch on the device, so both modes see the same teacher numbers): relative deviation of
# every loss term, and of every gradient tensor relative to its largest entry. AMP is looser:
# float16 (CUDA) / bfloat16 (CPU) rounding makes results depend on kernel order.
FAITHFUL_BOUNDS = {"fp32": {"loss": 1e-5, "grad": 1e-4}, "amp": {"loss": 1e-3, "grad": 2e-2}}
# extraction on the device vs on the CPU (fp32 codec): relative L2 of each FPN level and of the
# GT boxes' RoI logits. cuDNN runs fp32 convolutions in TF32 by default (10-bit mantissa).
EXTRACT_BOUNDS = {"features_rel_l2": 1e-2, "gt_logits_rel_l2": 2e-2, "proposals_matched": 0.5}
# decode on the device vs decode on the CPU of the same stored item: max |difference| over the
# level's max |value|. fp16/bf16 widen exactly; int8 is one fused multiply-add; compact a matmul.
DECODE_BOUNDS = {"fp16": 0.0, "bf16": 0.0, "int8": 1e-6, "compact": 1e-5}


# --------------------------------------------------------------------------------- env
def step_env(setup: Setup) -> tuple[dict, Checks]:
    """The machine and the versions the figures belong to."""
    import numcodecs
    import torchvision
    import zarr
    checks = Checks()
    figures = {
        "device": setup.device_name, "dry_run": setup.dry_run, "python": platform.python_version(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu_count": os.cpu_count(), "machine": platform.machine(), "git_commit": _git_commit(),
    }
    if setup.is_cuda:
        if not checks.true("cuda_available", torch.cuda.is_available(), "torch sees no CUDA device"):
            return figures, checks
        props = torch.cuda.get_device_properties(setup.device)
        figures.update(gpu=props.name, gpu_memory_GiB=round(props.total_memory / 2**30, 1),
                       capability=f"{props.major}.{props.minor}", gpu_count=torch.cuda.device_count(),
                       nccl=_nccl_version(),
                       cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                       matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                       driver=_nvidia_smi("driver_version"))
    else:
        figures["gpu"] = None
    figures["amp_dtype"] = str(setup.amp_dtype()).replace("torch.", "")
    return figures, checks


def _nccl_version() -> str | None:
    try:
        import torch.cuda.nccl as nccl
        v = nccl.version()
        return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception:  # a torch built without NCCL
        return None


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        return out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


# --------------------------------------------------------------------------------- cache == online
def _mixed_batches(ds, n: int) -> list[list[tuple[int, int]]]:
    """Two batches of 2 (image, view) pairs, an orig and an hflip view each, of images with
    different canvas sizes where the data has them (so the student batch is padded)."""
    canvas = [ds.sample(i, 0)["geometry"].canvas_size for i in range(n)]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n) if canvas[i] != canvas[j]]
    first = pairs[0] if pairs else (0, 1)
    second = next((p for p in pairs if set(p).isdisjoint(first)), (2, 3))
    return [[(first[0], 1), (first[1], 0)], [(second[0], 0), (second[1], 1)]]


def step_faithfulness(setup: Setup) -> tuple[dict, Checks]:
    """One DeFeat step from the cache equals the step with the teacher online, fp32 and AMP."""
    from defeat_cache.data.dataset import load_dataset
    from defeat_cache.engine.step_check import build_step, deviations, losses_and_grads
    from defeat_cache.models.sampling import item_seed
    from defeat_cache.models.zoo import load_model_spec
    checks = Checks()
    data = load_dataset(setup.data("small"), "train")
    spec = load_model_spec(setup.student("small"))
    preset = setup.preset("small")
    cache = setup.cache("small", "fp32", batch_size=1)
    device = setup.device
    online, online_src = build_step(spec, data, preset, device, teacher=setup.teacher("small"),
                                    teacher_checkpoint=str(setup.checkpoint("small")))
    cached, cache_src = build_step(spec, data, preset, device, cache=str(cache))
    cached.load_state_dict(online.state_dict())  # identical student AND adapter weights
    ds_on, ds_c = online_src.dataset(data), cache_src.dataset(data)
    batches = _mixed_batches(ds_on, len(data.records))
    probe = copy.deepcopy(cached.student.backbone).eval()  # a copy: a train-mode forward would move BN statistics
    with torch.autocast(device.type, enabled=True), torch.no_grad():  # AMP really lowers the precision here
        seen = next(iter(probe(torch.zeros(1, 3, 64, 64, device=device)).values())).dtype
    del probe
    figures: dict = {"batches": batches, "teacher": setup.teacher("small"), "student": spec.name,
                     "codec": "fp32", "amp_dtype": str(seen).replace("torch.", ""), "bounds": FAITHFUL_BOUNDS,
                     "decode_on_device": cache_src.decode_on_device}
    checks.true("autocast lowers precision", seen != torch.float32, f"backbone output under autocast is {seen}")
    for mode, amp in (("fp32", False), ("amp", True)):
        worst: dict[str, float] = {}
        for k, keys in enumerate(batches):
            seeds = [item_seed(0, 0, i, v) for i, v in keys]
            ref = losses_and_grads(online, online_src, [ds_on[key] for key in keys], device, seed=k, seeds=seeds,
                                   amp=amp)
            got = losses_and_grads(cached, cache_src, [ds_c[key] for key in keys], device, seed=k, seeds=seeds,
                                   amp=amp)
            for name, v in deviations(ref, got).items():
                worst[name] = max(worst.get(name, 0.0), v)
        grad = worst.pop("grad_rel_max")
        figures[mode] = {"loss_rel_max": float(f"{max(worst.values()):.3g}"), "grad_rel_max": float(f"{grad:.3g}"),
                         "per_term": {k: float(f"{v:.3g}") for k, v in sorted(worst.items())}}
        checks.bound(f"{mode} loss_rel_max", max(worst.values()), FAITHFUL_BOUNDS[mode]["loss"])
        checks.bound(f"{mode} grad_rel_max", grad, FAITHFUL_BOUNDS[mode]["grad"])
        checks.true(f"{mode} has the DeFeat terms",
                    {"loss_neck_obj", "loss_neck_bg", "loss_cls_pos", "loss_cls_neg"} <= set(worst))
    return figures, checks


# --------------------------------------------------------------------------------- extraction device vs CPU
def _matched_fraction(a: torch.Tensor, b: torch.Tensor, iou: float = 0.9) -> float:
    """Share of boxes in `a` that have a box in `b` at IoU >= `iou`."""
    from torchvision.ops import box_iou
    if len(a) == 0:
        return 1.0 if len(b) == 0 else 0.0
    if len(b) == 0:
        return 0.0
    return float((box_iou(a, b).max(dim=1).values >= iou).float().mean())


def step_extract_device(setup: Setup) -> tuple[dict, Checks]:
    """The same extraction (fp32 codec, one image a batch) on the device and on the CPU."""
    from defeat_cache.cache import TeacherCache
    from defeat_cache.cache.extract import extract
    checks = Checks()
    seconds, caches = {}, {}
    for label, where in (("cpu", "cpu"), ("device", setup.device_name)):
        out = setup.work / f"extract_on_{label}.zarr"
        t0 = time.perf_counter()
        extract(setup.extract_options("small", out, codec="fp32", batch_size=1, device=where))
        seconds[label], caches[label] = round(time.perf_counter() - t0, 2), TeacherCache(str(out))
    on_cpu, on_dev = caches["cpu"], caches["device"]
    feat, gtl, matched = [], [], []
    for i in range(len(on_cpu)):
        a, b = on_cpu.read(i), on_dev.read(i)
        feat.append(max(rel_l2(y, x) for x, y in zip(a.features, b.features)))
        if a.gt_logits.numel():
            gtl.append(rel_l2(b.gt_logits, a.gt_logits))
        matched.append(_matched_fraction(a.proposals, b.proposals))
    figures = {"items": len(on_cpu), "features_rel_l2_max": float(f"{max(feat):.3g}"),
               "gt_logits_rel_l2_max": float(f"{max(gtl, default=0.0):.3g}"),
               "proposals_matched_min": round(min(matched), 3), "proposals_matched_mean": round(sum(matched) / len(matched), 3),
               "extract_seconds": seconds, "bounds": EXTRACT_BOUNDS,
               "note": "proposals: share of the CPU's proposals with a device proposal at IoU >= 0.9; a random-weight "
                       "teacher's near-equal scores make the top-N choice sensitive to rounding, hence the loose bound"}
    checks.bound("features_rel_l2_max", max(feat), EXTRACT_BOUNDS["features_rel_l2"])
    checks.bound("gt_logits_rel_l2_max", max(gtl, default=0.0), EXTRACT_BOUNDS["gt_logits_rel_l2"])
    checks.bound("proposals_matched_mean", sum(matched) / len(matched), EXTRACT_BOUNDS["proposals_matched"], ">=")
    return figures, checks


# --------------------------------------------------------------------------------- per-image sampling
def _matched_idxs(n: int, n_pos: int, n_ignored: int, seed: int, device) -> torch.Tensor:
    """A matcher's output for n anchors/RoIs: n_pos positives (classes 1..3), n_ignored -1, the rest 0."""
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(n, dtype=torch.long)
    idx = torch.randperm(n, generator=g)
    m[idx[:n_pos]] = 1 + torch.randint(3, (n_pos,), generator=g)
    m[idx[n_pos:n_pos + n_ignored]] = -1
    return m.to(device)


def step_sampling(setup: Setup) -> tuple[dict, Checks]:
    """Per-image sampling on the device (generators on the device): an image's draw does not
    depend on the batch around it, repeats exactly, and keeps torchvision's counts; the random
    imitation mask likewise."""
    from defeat_cache.distill.masks import build_level_masks
    from defeat_cache.models.sampling import ItemSeededSampler, image_generators, item_seed
    checks = Checks()
    device = setup.device
    a, b, c = (_matched_idxs(n, p, ig, s, device) for n, p, ig, s in ((5000, 40, 500, 0), (3000, 5, 20, 1),
                                                                      (4000, 900, 0, 2)))
    seeds = [item_seed(0, 0, i, 0) for i in range(3)]
    sampler = ItemSeededSampler(256, 0.25, "rpn")
    sampler.seeds = seeds
    pos_all, neg_all = sampler([a, b, c])
    sampler.seeds = [seeds[1]]
    pos_b, neg_b = sampler([b])
    sampler.seeds = [seeds[2], seeds[0]]
    pos_ca, neg_ca = sampler([c, a])
    sampler.seeds = seeds
    pos_again, _ = sampler([a, b, c])
    checks.true("on the device", pos_all[0].device.type == device.type, str(pos_all[0].device))
    checks.true("alone == in batch", torch.equal(pos_all[1], pos_b[0]) and torch.equal(neg_all[1], neg_b[0]))
    checks.true("reordered batch", torch.equal(pos_all[0], pos_ca[1]) and torch.equal(neg_all[2], neg_ca[0]))
    checks.true("repeats exactly", all(torch.equal(x, y) for x, y in zip(pos_all, pos_again)))
    for name, m, p, n in zip("abc", (a, b, c), pos_all, neg_all):
        checks.true(f"counts of {name}", int(p.sum()) == min(64, int((m >= 1).sum())) and int(p.sum() + n.sum()) == 256)
        checks.true(f"only eligible entries of {name}", bool((m[p.bool()] >= 1).all()) and bool((m[n.bool()] == 0).all()))
    sampler.seeds = [item_seed(0, 1, 0, 0)]  # another epoch draws differently
    checks.true("another epoch, another draw", not torch.equal(sampler([a])[1][0], neg_all[0]))

    boxes = [torch.tensor([[4.0, 4.0, 40.0, 36.0]], device=device),
             torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 16.0, 16.0]], device=device)]
    sizes, strides = [(16, 16), (8, 8)], [4, 8]
    mseeds = [item_seed(0, 0, 7, 0), item_seed(0, 0, 9, 1)]
    pair = build_level_masks("random", boxes, sizes, strides, finest_scale=8,
                             generators=image_generators(mseeds, "random_mask", device))
    alone = build_level_masks("random", boxes[1:], sizes, strides, finest_scale=8,
                              generators=image_generators(mseeds[1:], "random_mask", device))
    checks.true("random mask alone == in batch", all(torch.equal(p[1], q[0]) for p, q in zip(pair, alone)))
    return {"images": 3, "anchors": [5000, 3000, 4000], "batch_size_per_image": 256,
            "generator_device": str(image_generators(seeds[:1], "rpn", device)[0].device)}, checks


# --------------------------------------------------------------------------------- lossy codecs
def step_codecs(setup: Setup) -> tuple[dict, Checks]:
    """Every lossy codec's stored items decode the same on the device (what training does on
    CUDA: `decode_item` of `read_encoded`) as on the CPU (`read`, numpy)."""
    from defeat_cache.cache import TeacherCache
    checks = Checks()
    figures: dict = {"bounds": DECODE_BOUNDS}
    for codec, bound in DECODE_BOUNDS.items():
        cache = TeacherCache(str(setup.cache("small", codec)))
        worst, on_device = 0.0, True
        for i in range(len(cache)):
            on_cpu = cache.read(i)
            decoded = cache.decode_item(cache.read_encoded(i), setup.device)
            for x, y in zip(on_cpu.features, decoded.features):
                on_device &= y.device.type == setup.device.type
                worst = max(worst, float((y.cpu() - x).abs().max() / x.abs().max().clamp_min(1e-30)))
        figures[codec] = {"items": len(cache), "max_rel_diff": float(f"{worst:.3g}")}
        checks.bound(f"{codec} max_rel_diff", worst, bound)
        checks.true(f"{codec} decoded on the device", on_device)
    return figures, checks


# --------------------------------------------------------------------------------- torchrun
def step_torchrun(setup: Setup) -> tuple[dict, Checks]:
    """A 1-process torchrun (NCCL on CUDA, gloo on CPU) that extracts a cache, trains 2 steps
    from it, and trains 2 steps with --sync-bn (CUDA only: on the CPU it must be refused with
    the one-line error)."""
    checks = Checks()
    result = setup.work / "torchrun_result.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(Path(__file__).resolve().parent / "gpu_check.py"), "--torchrun-worker", str(result),
           "--device", setup.device_name, "--work", str(setup.work)] + (["--dry-run"] if setup.dry_run else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    figures: dict = {"returncode": proc.returncode, "seconds_with_launch": round(time.perf_counter() - t0, 1)}
    if proc.returncode != 0 or not result.is_file():
        sys.stderr.write(proc.stderr[-4000:])
        checks.true("torchrun exit status 0", False, f"exit status {proc.returncode}; stderr: "
                    + " | ".join(proc.stderr.strip().splitlines()[-3:]))
        return figures, checks
    worker = json.loads(result.read_text())
    figures.update(worker)
    checks.true("process group", worker["backend"] == ("nccl" if setup.is_cuda else "gloo") and worker["world_size"] == 1,
                f"backend {worker['backend']}, world size {worker['world_size']}")
    checks.true("extract complete", bool(worker["extract"].get("complete")), str(worker["extract"]))
    checks.true("train ran 2 steps", worker["train"].get("iterations") == 2 and worker["train"].get("finite"),
                str(worker["train"]))
    if setup.is_cuda:
        checks.true("sync-bn ran 2 steps", worker["sync_bn"].get("iterations") == 2 and worker["sync_bn"].get("finite")
                    and worker["sync_bn"].get("sync_bn_layers", 0) > 0, str(worker["sync_bn"]))
    else:
        checks.true("sync-bn refused on the CPU with one line", "--sync-bn needs CUDA" in worker["sync_bn"].get("error", ""),
                    str(worker["sync_bn"]))
    return figures, checks


def torchrun_worker(setup: Setup, result: Path) -> None:
    """What step_torchrun runs under torchrun: the library calls the CLI's extract and train make."""
    import math
    import shutil

    import torch.distributed as dist

    from defeat_cache import distributed as du
    from defeat_cache.cache.extract import extract
    from defeat_cache.engine import train as train_mod
    from defeat_cache.engine.train import TrainOptions, train
    from defeat_cache.errors import UserError
    cache, runs = setup.work / "torchrun_cache.zarr", setup.work / "torchrun_runs"
    for path in (cache, runs):
        shutil.rmtree(path, ignore_errors=True)
    out: dict = {}
    out["extract"] = extract(setup.extract_options("small", cache, codec="fp16", items_per_shard=4))
    out["backend"], out["world_size"] = dist.get_backend(), dist.get_world_size()

    def one_run(name: str, **extra) -> dict:
        opts = TrainOptions(student=setup.student("small"), data=str(setup.data("small")), out=str(runs / name),
                            cache=str(cache), distill=setup.preset("small"), max_iters=2, batch_size=2,
                            workers=min(2, setup.sizes.train_workers), device=setup.device_name, log_every=1,
                            progress=False, checkpoint_minutes=1e9, **extra)
        try:
            summary = train(opts)
        except UserError as e:
            return {"error": str(e)}
        lines = [json.loads(x) for x in (runs / name / "metrics.jsonl").read_text().splitlines()]
        return {"iterations": summary["iterations"], "finite": all(math.isfinite(x["loss"]) for x in lines),
                "final_loss": round(lines[-1]["loss"], 4), "amp": opts.amp and setup.is_cuda}

    out["train"] = one_run("cache")
    converted = []
    real_convert = torch.nn.SyncBatchNorm.convert_sync_batchnorm

    def counting(module, *a, **kw):  # how many BatchNorm layers --sync-bn turned into SyncBatchNorm
        new = real_convert(module, *a, **kw)
        converted.append(sum(isinstance(m, torch.nn.SyncBatchNorm) for m in new.modules()))
        return new

    train_mod.nn.SyncBatchNorm.convert_sync_batchnorm = staticmethod(counting)
    try:
        out["sync_bn"] = one_run("sync_bn", sync_bn=True)
    finally:
        train_mod.nn.SyncBatchNorm.convert_sync_batchnorm = staticmethod(real_convert)
    out["sync_bn"]["sync_bn_layers"] = converted[0] if converted else 0
    # torch's SyncBatchNorm reduces over ranks only when there are several; NCCL refuses two ranks on one GPU
    out["sync_bn"]["note"] = "world size 1: the layers run plain batch norm; the cross-rank reduction needs 2 GPUs"
    write_json(result, out)
    du.cleanup()
