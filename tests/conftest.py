"""Shared fixtures: tiny models, a tiny synthetic dataset, and small file writers.

Everything here is sized for a 2-core CPU: models take 64..96 px inputs and have a few hundred
thousand parameters; the dataset has 12 train / 6 val images of 64..96 px.

Session-scoped fixtures (build once, treat as read-only; copy before modifying):

* ``tiny_model_toml``   -- path of a tiny Faster R-CNN model TOML (quarter-width ResNet-18, 32-ch FPN).
                          Pass it wherever a model name is accepted (``load_model_spec``, ``--student``,
                          ``--teacher``); the model's name is the file stem, ``tiny_frcnn``.
* ``tiny_retina_toml``  -- the same for RetinaNet (``tiny_retina``).
* ``tiny_shapes``       -- path of the ``data.toml`` of a tiny synthetic shapes dataset
                          (COCO format, 8 classes, splits ``train`` = 12 and ``val`` = 6 images).
* ``tiny_trained_checkpoint`` -- ``final.pt`` of a 2-iteration training of ``tiny_model_toml`` on
                          ``tiny_shapes`` (a usable teacher checkpoint for extraction/distillation tests;
                          load it with ``load_weights``: ``load_trained`` needs a zoo model name).

Factories (plain functions exposed as fixtures, so test modules need no imports from here):

* ``write_model_toml(path, **sections)`` -- writes a tiny model TOML, sections overriding the defaults.
* ``write_png(path, width, height, color=(..))`` -- writes a solid-colour RGB PNG (or JPEG by suffix).
* ``write_json(path, obj)`` -- writes JSON, creating parent folders.
* ``torchrun(args, env=None, nproc=2, timeout=240)`` -- ``python -m torch.distributed.run --standalone
  --nproc_per_node=NPROC *args`` with one torch thread per rank; returns the CompletedProcess (text).
* ``assert_same_caches(a, b, atol=0)`` -- two caches' zarr groups hold the same arrays, equal within atol.

Torch runs single-threaded in tests (``pytest_configure``): the models are tiny, the machine has
2 shared cores, and intra-op threads spinning against other processes made tiny forwards ~10x slower.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def pytest_configure(config):
    torch.set_num_threads(1)

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


def write_png(path: str | Path, width: int, height: int, color=(120, 60, 200)) -> Path:
    """A solid-colour RGB image; the format follows the suffix (.png, .jpg)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), tuple(color)).save(path)
    return path


def write_json(path: str | Path, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model_toml(tmp_path_factory) -> Path:
    """Path of the tiny Faster R-CNN model TOML (model name ``tiny_frcnn``)."""
    return write_model_toml(tmp_path_factory.mktemp("models") / "tiny_frcnn.toml")


@pytest.fixture(scope="session")
def tiny_retina_toml(tmp_path_factory) -> Path:
    """Path of the tiny RetinaNet model TOML (model name ``tiny_retina``)."""
    return write_model_toml(tmp_path_factory.mktemp("models") / "tiny_retina.toml", base=TINY_RETINA)


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory) -> Path:
    """data.toml of a tiny shapes dataset: 12 train / 6 val images, 64..96 px, seed 0, 8 classes."""
    from defeat_cache.data.shapes import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("shapes"), num_train=12, num_val=6, seed=0,
                           min_side=64, max_side=96, progress=False)


@pytest.fixture(scope="session")
def tiny_trained_checkpoint(tmp_path_factory, tiny_model_toml, tiny_shapes) -> Path:
    """final.pt of 2 training iterations of the tiny Faster R-CNN on ``tiny_shapes`` (seed 0)."""
    from defeat_cache.engine.train import TrainOptions, train

    out = tmp_path_factory.mktemp("tiny_run")
    summary = train(TrainOptions(student=str(tiny_model_toml), data=str(tiny_shapes), out=str(out),
                                 max_iters=2, batch_size=2, workers=0, log_every=1, progress=False))
    return Path(summary["final"])


@pytest.fixture(name="write_model_toml", scope="session")
def _write_model_toml_fixture():
    """Factory: ``write_model_toml(path, base=None, **sections) -> Path`` (see module docstring)."""
    return write_model_toml


@pytest.fixture(name="write_png", scope="session")
def _write_png_fixture():
    """Factory: ``write_png(path, width, height, color=(r, g, b)) -> Path``."""
    return write_png


@pytest.fixture(name="write_json", scope="session")
def _write_json_fixture():
    """Factory: ``write_json(path, obj) -> Path``."""
    return write_json


def torchrun(args, env: dict | None = None, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def assert_same_caches(a, b, atol: float = 0.0) -> None:
    import numpy as np
    names = sorted(k for k, _ in a.arrays())
    assert names == sorted(k for k, _ in b.arrays()) and {"rois", "meta", "shard_done"} <= set(names)
    for sub, group in a.groups():  # features/, backbone/
        names += [f"{sub}/{k}" for k, _ in group.arrays()]
    assert any(n.startswith("features/") for n in names)
    for name in names:
        np.testing.assert_allclose(a[name][:], b[name][:], rtol=0, atol=atol, err_msg=name)


@pytest.fixture(name="torchrun", scope="session")
def _torchrun_fixture():
    """Factory: ``torchrun(args, env=None, nproc=2, timeout=240) -> CompletedProcess`` (see module docstring)."""
    return torchrun


@pytest.fixture(name="assert_same_caches", scope="session")
def _assert_same_caches_fixture():
    """``assert_same_caches(group_a, group_b, atol=0.0)`` (see module docstring)."""
    return assert_same_caches


# --------------------------------------------------------------------------------------------
# teacher checkpoints and teacher caches (extraction / distillation tests)
# --------------------------------------------------------------------------------------------

#: Proposal settings every tiny cache below is extracted with. Online-mode distillation that is
#: compared with these caches must use the same values (preset ``teacher.proposals`` /
#: ``teacher.pre_nms_top_n``).
TINY_PROPOSALS = 20
TINY_PRE_NMS = 50
#: 12 images x 2 views = 24 items -> 5 shards (the last one holds 4 items).
TINY_ITEMS_PER_SHARD = 5


def _random_detector_checkpoint(path: Path, model_toml: Path, data_toml: Path, seed: int = 0) -> Path:
    import torch

    from defeat_cache.data.dataset import load_dataset
    from defeat_cache.models.zoo import build_detector

    num_classes = load_dataset(data_toml, "train").num_classes
    torch.manual_seed(seed)
    model = build_detector(str(model_toml), num_classes)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_state": model.state_dict()}, path)
    return path


@pytest.fixture(name="random_detector_checkpoint", scope="session")
def _random_detector_checkpoint_fixture():
    """Factory: ``random_detector_checkpoint(path, model_toml, data_toml, seed=0) -> Path``: the
    randomly initialised detector (``torch.manual_seed(seed)``) saved as ``{"model_state": ...}``."""
    return _random_detector_checkpoint


@pytest.fixture(scope="session")
def tiny_student_toml(tmp_path_factory) -> Path:
    """A smaller Faster R-CNN student (eighth-width ResNet-18, 16-ch FPN; name ``tiny_student``),
    with the same preprocessing as ``tiny_model_toml`` (so it can distil from its caches)."""
    return write_model_toml(tmp_path_factory.mktemp("models") / "tiny_student.toml",
                            backbone={"width_divisor": 8, "fpn_channels": 16}, roi={"representation_size": 32})


@pytest.fixture(scope="session")
def tiny_teacher_checkpoint(tmp_path_factory, tiny_model_toml, tiny_shapes) -> Path:
    """Randomly initialised (seed 0) ``tiny_model_toml`` detector for ``tiny_shapes`` (9 classes)."""
    return _random_detector_checkpoint(tmp_path_factory.mktemp("teacher") / "teacher.pt", tiny_model_toml, tiny_shapes)


@pytest.fixture(scope="session")
def tiny_retina_checkpoint(tmp_path_factory, tiny_retina_toml, tiny_shapes) -> Path:
    """Randomly initialised (seed 0) ``tiny_retina_toml`` detector for ``tiny_shapes``."""
    return _random_detector_checkpoint(tmp_path_factory.mktemp("teacher") / "retina.pt", tiny_retina_toml, tiny_shapes)


@pytest.fixture(scope="session")
def reference_cache(tmp_path_factory, tiny_model_toml, tiny_teacher_checkpoint, tiny_shapes) -> str:
    """One-process fp32 extraction with the CLI's defaults but --proposals 20 --items-per-shard 2
    --batch-size 1: what the torchrun extraction tests compare their caches with."""
    from defeat_cache.cache.extract import ExtractOptions, extract

    out = tmp_path_factory.mktemp("ref") / "one_process.zarr"
    extract(ExtractOptions(teacher=str(tiny_model_toml), checkpoint=str(tiny_teacher_checkpoint),
                           data=str(tiny_shapes), out=str(out), codec="fp32", proposals=20, items_per_shard=2,
                           batch_size=1, workers=0, progress=False))
    return str(out)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, tiny_model_toml, tiny_teacher_checkpoint, tiny_shapes):
    """Factory ``tiny_cache(codec="fp32", backbone=False) -> str``: a complete teacher cache of
    ``tiny_teacher_checkpoint`` over ``tiny_shapes``/train (views orig,hflip; TINY_PROPOSALS /
    TINY_PRE_NMS; TINY_ITEMS_PER_SHARD items per shard), extracted once per session and argument
    pair. Extracted with batch_size=1, so every item is bit-identical to a single-image teacher
    forward (what online distillation computes). Read-only: copy before modifying."""
    from defeat_cache.cache.extract import ExtractOptions, extract

    made: dict = {}

    def get(codec: str = "fp32", backbone: bool = False) -> str:
        key = (codec, bool(backbone))
        if key not in made:
            out = tmp_path_factory.mktemp(f"cache_{codec}{'_bb' if backbone else ''}") / "cache.zarr"
            extract(ExtractOptions(teacher=str(tiny_model_toml), checkpoint=str(tiny_teacher_checkpoint),
                                   data=str(tiny_shapes), out=str(out), codec=codec, proposals=TINY_PROPOSALS,
                                   pre_nms_top_n=TINY_PRE_NMS, backbone=backbone, batch_size=1, workers=0,
                                   items_per_shard=TINY_ITEMS_PER_SHARD, progress=False))
            made[key] = str(out)
        return made[key]

    get.proposals, get.pre_nms_top_n, get.items_per_shard = TINY_PROPOSALS, TINY_PRE_NMS, TINY_ITEMS_PER_SHARD
    return get
