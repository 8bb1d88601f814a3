"""Shared fixtures: tiny models, a tiny synthetic dataset, teacher checkpoints and teacher caches.

Everything here is sized for a 2-core CPU: models take 64..96 px inputs and have a few hundred
thousand parameters; the dataset has 12 train / 6 val images of 64..96 px. The plain functions
these fixtures are built with (model TOML, file and dataset writers, extraction / training
options, torchrun) are in builders.py, the comparisons in checks.py: test modules import them.

Session-scoped fixtures (build once, treat as read-only; copy before modifying):

* ``tiny_model_toml``   -- path of a tiny Faster R-CNN model TOML (quarter-width ResNet-18, 32-ch FPN).
                          Pass it wherever a model name is accepted (``load_model_spec``, ``--student``,
                          ``--teacher``); the model's name is the file stem, ``tiny_frcnn``.
* ``tiny_retina_toml``  -- the same for RetinaNet (``tiny_retina``).
* ``tiny_student_toml`` -- a smaller Faster R-CNN student (``tiny_student``) with the teacher's preprocessing.
* ``tiny_shapes``       -- path of the ``data.toml`` of a tiny synthetic shapes dataset
                          (COCO format, 8 classes, splits ``train`` = 12 and ``val`` = 6 images).
* ``tiny_trained_checkpoint`` -- ``final.pt`` of a 2-iteration training of ``tiny_model_toml`` on
                          ``tiny_shapes`` (a usable teacher checkpoint for extraction/distillation tests;
                          load it with ``load_weights``: ``load_trained`` needs a zoo model name).
* ``tiny_teacher_checkpoint`` / ``tiny_retina_checkpoint`` -- randomly initialised teachers (seed 0).
* ``reference_cache``   -- the one-process extraction the torchrun extraction tests compare with.
* ``tiny_cache``        -- factory ``tiny_cache(codec="fp32", backbone=False) -> str``: teacher caches.

Torch runs single-threaded in tests (``pytest_configure``): the models are tiny, the machine has
2 shared cores, and intra-op threads spinning against other processes made tiny forwards ~10x slower.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from builders import (TINY_ITEMS_PER_SHARD, TINY_PRE_NMS, TINY_PROPOSALS, TINY_RETINA, cli_extract_options,
                      random_detector_checkpoint, shapes_dataset, tiny_extract_options, tiny_train_options,
                      write_model_toml)


def pytest_configure(config):
    torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# models, dataset, a trained checkpoint
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
def tiny_student_toml(tmp_path_factory) -> Path:
    """A smaller Faster R-CNN student (eighth-width ResNet-18, 16-ch FPN; name ``tiny_student``),
    with the same preprocessing as ``tiny_model_toml`` (so it can distil from its caches)."""
    return write_model_toml(tmp_path_factory.mktemp("models") / "tiny_student.toml",
                            backbone={"width_divisor": 8, "fpn_channels": 16}, roi={"representation_size": 32})


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory) -> Path:
    """data.toml of a tiny shapes dataset: 12 train / 6 val images, 64..96 px, seed 0, 8 classes."""
    return shapes_dataset(tmp_path_factory.mktemp("shapes"), num_train=12, num_val=6)


@pytest.fixture(scope="session")
def tiny_trained_checkpoint(tmp_path_factory, tiny_model_toml, tiny_shapes) -> Path:
    """final.pt of 2 training iterations of the tiny Faster R-CNN on ``tiny_shapes`` (seed 0)."""
    from defeat_cache.engine.train import train

    summary = train(tiny_train_options(tiny_model_toml, tiny_shapes, tmp_path_factory.mktemp("tiny_run")))
    return Path(summary["final"])


# --------------------------------------------------------------------------------------------
# teacher checkpoints and teacher caches (extraction / distillation tests)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_teacher_checkpoint(tmp_path_factory, tiny_model_toml, tiny_shapes) -> Path:
    """Randomly initialised (seed 0) ``tiny_model_toml`` detector for ``tiny_shapes`` (9 classes)."""
    return random_detector_checkpoint(tmp_path_factory.mktemp("teacher") / "teacher.pt", tiny_model_toml, tiny_shapes)


@pytest.fixture(scope="session")
def tiny_retina_checkpoint(tmp_path_factory, tiny_retina_toml, tiny_shapes) -> Path:
    """Randomly initialised (seed 0) ``tiny_retina_toml`` detector for ``tiny_shapes``."""
    return random_detector_checkpoint(tmp_path_factory.mktemp("teacher") / "retina.pt", tiny_retina_toml, tiny_shapes)


@pytest.fixture(scope="session")
def reference_cache(tmp_path_factory, tiny_model_toml, tiny_teacher_checkpoint, tiny_shapes) -> str:
    """One-process extraction of ``builders.cli_extract_argv`` (fp32, the CLI's defaults but
    --proposals 20 --items-per-shard 5 --batch-size 3): what the torchrun extraction tests compare
    their caches with, bit for bit."""
    from defeat_cache.cache.extract import extract

    out = tmp_path_factory.mktemp("ref") / "one_process.zarr"
    extract(cli_extract_options(tiny_model_toml, tiny_teacher_checkpoint, tiny_shapes, out))
    return str(out)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, tiny_model_toml, tiny_teacher_checkpoint, tiny_shapes):
    """Factory ``tiny_cache(codec="fp32", backbone=False) -> str``: a complete teacher cache of
    ``tiny_teacher_checkpoint`` over ``tiny_shapes``/train (views orig,hflip; TINY_PROPOSALS /
    TINY_PRE_NMS; TINY_ITEMS_PER_SHARD items per shard), extracted once per session and argument
    pair. Extracted with batch_size=1, so every item is bit-identical to a single-image teacher
    forward (what online distillation computes). Read-only: copy before modifying."""
    from defeat_cache.cache.extract import extract

    made: dict = {}

    def get(codec: str = "fp32", backbone: bool = False) -> str:
        key = (codec, bool(backbone))
        if key not in made:
            out = tmp_path_factory.mktemp(f"cache_{codec}{'_bb' if backbone else ''}") / "cache.zarr"
            extract(tiny_extract_options(tiny_model_toml, tiny_teacher_checkpoint, tiny_shapes, out, codec=codec,
                                         backbone=backbone))
            made[key] = str(out)
        return made[key]

    get.proposals, get.pre_nms_top_n, get.items_per_shard = TINY_PROPOSALS, TINY_PRE_NMS, TINY_ITEMS_PER_SHARD
    return get
