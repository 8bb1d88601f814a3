"""Builds what the tests run on, with the tiny defaults held once: model TOMLs, small image and
JSON files, synthetic datasets, randomly initialised teacher checkpoints, extraction and training
options, and the `defeat-cache extract` command line the multi-process tests launch with torchrun.

Plain functions: test modules import them (``from builders import ...``); conftest.py turns a few
of them into session fixtures (``tiny_model_toml``, ``tiny_shapes``, ``tiny_cache``, ...).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

from defeat_cache.cache.extract import ExtractOptions
from defeat_cache.data.dataset import load_dataset
from defeat_cache.data.shapes import generate_shapes
from defeat_cache.engine.train import TrainOptions
from defeat_cache.models.zoo import build_detector

# --------------------------------------------------------------------------------------------
# tiny model configs
# --------------------------------------------------------------------------------------------

#: The tiny Faster R-CNN: r18q_fpn_cpu with 64/96 px inputs, a 32-channel FPN and small heads.
TINY_FRCNN: dict = {
    "family": "faster_rcnn",
    "backbone": {"depth": 18, "width_divisor": 4, "fpn_channels": 32, "norm": "bn", "trainable_layers": 5},
    "input": {"min_size": 64, "max_size": 96},
    "anchors": {"sizes": [16, 32, 64, 128, 256]},
    "rpn": {"pre_nms_top_n_train": 100, "post_nms_top_n_train": 50, "pre_nms_top_n_test": 50,
            "post_nms_top_n_test": 25, "batch_size_per_image": 32},
    "roi": {"representation_size": 64, "batch_size_per_image": 32, "positive_fraction": 0.25,
            "detections_per_img": 20},
}

#: The tiny RetinaNet (same backbone, P3-P7).
TINY_RETINA: dict = {
    "family": "retinanet",
    "backbone": {"depth": 18, "width_divisor": 4, "fpn_channels": 32, "norm": "bn", "trainable_layers": 5},
    "input": {"min_size": 64, "max_size": 96},
    "anchors": {"sizes": [16, 32, 64, 128, 256]},
    "head": {"detections_per_img": 20, "topk_candidates": 50},
}


def _toml_scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_scalar(x) for x in v) + "]"
    return json.dumps(str(v))


def to_toml(cfg: dict) -> str:
    """Minimal TOML writer for flat top-level keys plus one level of tables (enough for configs)."""
    lines = [f"{k} = {_toml_scalar(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    for k, v in cfg.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {_toml_scalar(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def write_model_toml(path: str | Path, base: dict | None = None, **sections) -> Path:
    """Writes a model TOML at `path` (its stem is the model's name).

    `base` defaults to the tiny Faster R-CNN; each keyword is a section name whose dict is merged
    into that section (``backbone={"norm": "frozen_bn"}``), or a top-level scalar (``family=...``).
    """
    cfg = copy.deepcopy(base if base is not None else TINY_FRCNN)
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_toml(cfg))
    return path


# --------------------------------------------------------------------------------------------
# small files and datasets
# --------------------------------------------------------------------------------------------


def write_png(path: str | Path, width: int, height: int, color=(120, 60, 200)) -> Path:
    """A solid-colour RGB image; the format follows the suffix (.png, .jpg)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), tuple(color)).save(path)
    return path


def write_json(path: str | Path, obj) -> Path:
    """Writes `obj` as JSON, creating the parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def shapes_dataset(out_dir: str | Path, num_train: int, num_val: int, seed: int = 0, min_side: int = 64,
                   max_side: int = 96) -> Path:
    """data.toml of a synthetic shapes dataset of tiny-model-sized images (64..96 px by default)."""
    return generate_shapes(out_dir, num_train=num_train, num_val=num_val, seed=seed, min_side=min_side,
                           max_side=max_side, progress=False)


def random_detector_checkpoint(path: Path, model_toml: Path, data_toml: Path, seed: int = 0) -> Path:
    """The randomly initialised detector (``torch.manual_seed(seed)``) of `model_toml` for the
    classes of `data_toml`'s train split, saved as ``{"model_state": ...}``: a teacher to extract."""
    num_classes = load_dataset(data_toml, "train").num_classes
    torch.manual_seed(seed)
    model = build_detector(str(model_toml), num_classes)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_state": model.state_dict()}, path)
    return path


# --------------------------------------------------------------------------------------------
# extraction and training options
# --------------------------------------------------------------------------------------------

#: Proposal settings of the tiny extractions. Online-mode distillation that is compared with their
#: caches must use the same values (preset ``teacher.proposals`` / ``teacher.pre_nms_top_n``).
TINY_PROPOSALS = 20
TINY_PRE_NMS = 50
#: 12 images x 2 views = 24 items -> 5 shards (the last one holds 4 items).
TINY_ITEMS_PER_SHARD = 5


#: ExtractOptions' pre_nms_top_n, which is also the CLI's (it has no option for it): a cache that is
#: compared with one `defeat-cache extract` wrote is extracted with it.
DEFAULT_PRE_NMS = ExtractOptions.pre_nms_top_n


def tiny_extract_options(teacher: str | Path, checkpoint: str | Path, data: str | Path, out: str | Path, /,
                         **overrides) -> ExtractOptions:
    """ExtractOptions for the tiny setup: fp32, TINY_PROPOSALS / TINY_PRE_NMS, one image a batch (so
    every item is bit-identical to a single-image teacher forward), TINY_ITEMS_PER_SHARD items a
    shard, no DataLoader workers, no progress bar; `overrides` replace any option (the four paths too)."""
    options = dict(teacher=str(teacher), checkpoint=str(checkpoint), data=str(data), out=str(out), codec="fp32",
                   proposals=TINY_PROPOSALS, pre_nms_top_n=TINY_PRE_NMS, batch_size=1,
                   items_per_shard=TINY_ITEMS_PER_SHARD, workers=0, progress=False)
    return ExtractOptions(**{**options, **overrides})


#: Shards and teacher batches of the multi-process extraction tests: 12 images (64..96 px) x 2 views
#: -> 5 shards of 5 items (the last 4), teacher batches of 3: a shard's last batch is short, and a
#: batch that crossed a shard boundary would mix images of different sizes (another padded shape).
CLI_ITEMS_PER_SHARD = 5
CLI_BATCH_SIZE = 3


def cli_extract_argv(teacher, checkpoint, data, out) -> list[str]:
    """`defeat-cache extract` arguments of the multi-process extraction tests; `cli_extract_options`
    is the same extraction in one process."""
    return ["extract", "--teacher", str(teacher), "--checkpoint", str(checkpoint), "--data", str(data),
            "--out", str(out), "--codec", "fp32", "--proposals", str(TINY_PROPOSALS),
            "--items-per-shard", str(CLI_ITEMS_PER_SHARD), "--batch-size", str(CLI_BATCH_SIZE), "--workers", "0"]


def cli_extract_options(teacher, checkpoint, data, out, /, **overrides) -> ExtractOptions:
    """The extraction of `cli_extract_argv` as ExtractOptions (the CLI's pre_nms_top_n)."""
    return tiny_extract_options(teacher, checkpoint, data, out, **{
        "pre_nms_top_n": DEFAULT_PRE_NMS, "items_per_shard": CLI_ITEMS_PER_SHARD, "batch_size": CLI_BATCH_SIZE,
        **overrides})


def tiny_train_options(student: str | Path, data: str | Path, out: str | Path, /, **overrides) -> TrainOptions:
    """TrainOptions for a few iterations of a tiny run: 2 iterations of 2 images, a metrics line
    every iteration, no DataLoader workers, no progress bar; `overrides` replace any option (the paths too)."""
    # last.pt at the end only: no time-based checkpoint writes slowing a run on a busy machine
    options = dict(student=str(student), data=str(data), out=str(out), max_iters=2, batch_size=2, workers=0,
                   log_every=1, progress=False, checkpoint_minutes=1e9)
    return TrainOptions(**{**options, **overrides})


# --------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------


def torchrun(args, env: dict | None = None, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node=NPROC *args`` with one torch
    thread per rank; returns the CompletedProcess (text)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
