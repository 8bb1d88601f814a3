"""Neck KD between pyramids that differ: levels paired by stride (distill/compat.shared_levels).

The realistic pairs users start from: torchvision's v2 R50 Faster R-CNN as the teacher, a v1 R50
or a MobileNetV3-Large FPN student (levels P5a, P5 at stride 32, P6 at 64). One distillation step
on small images (random weights: only the wiring is under test), plus which teacher levels the
neck loss reads.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from defeat_cache.distill.compat import TeacherFacts
from defeat_cache.distill.distiller import build_distiller
from defeat_cache.distill.presets import load_preset
from defeat_cache.engine.train import TrainStep
from defeat_cache.models.forward import detector_forward
from defeat_cache.models.teacher import teacher_outputs
from defeat_cache.models.zoo import build_detector, load_model_spec

NUM_CLASSES = 4
# Boxes of 40 and 70 px: with finest_scale 4 they fall on the teacher's P5 and P6 (levels 3, 4),
# the levels a MobileNetV3 student shares with it.
PRESET = ["neck.finest_scale=4", "teacher.proposals=20", "teacher.pre_nms_top_n=50"]


def _small(name: str):
    spec = load_model_spec(name)
    spec.config = copy.deepcopy(spec.config)
    spec.config["rpn"].update(pre_nms_top_n_train=100, post_nms_top_n_train=40, pre_nms_top_n_test=100,
                              post_nms_top_n_test=40, batch_size_per_image=32)
    spec.config["roi"].update(batch_size_per_image=32)
    return spec


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 64, 96, generator=g), torch.randn(3, 96, 80, generator=g)]  # two canvases
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 10.0, 75.0, 80.0], [40.0, 20.0, 80.0, 60.0]]),
                "labels": torch.tensor([2, 3])}]
    return images, targets


@pytest.fixture(scope="module")
def v2_teacher(batch):
    spec = _small("r50_fpn_v2")
    torch.manual_seed(0)
    teacher = build_detector(spec, NUM_CLASSES).eval().requires_grad_(False)
    images, targets = batch
    outs = teacher_outputs(teacher, images, [t["boxes"] for t in targets], num_proposals=20, pre_nms_top_n=50)
    return spec, outs


# r50q_fpn: torchvision's v1 R50 FPN at quarter width (the same levels as r50_fpn, a quarter of the CPU time)
@pytest.mark.parametrize("student_name, pairs", [("mobilenet_v3_fpn", ((0, 3), (1, 3), (2, 4))),
                                                 ("r50q_fpn", tuple((i, i) for i in range(5)))])
def test_one_distillation_step_from_the_v2_teacher(student_name, pairs, v2_teacher, batch):
    t_spec, outs = v2_teacher
    s_spec = _small(student_name)
    torch.manual_seed(1)
    student = build_detector(s_spec, NUM_CLASSES)
    dist = build_distiller(load_preset("defeat", PRESET), s_spec, TeacherFacts.of_spec(t_spec))
    assert dist.neck_pairs == pairs and dist.parts == ["neck", "cls"]
    step = TrainStep(student, dist).train()
    images, targets = batch
    losses = step(images, [dict(t) for t in targets], outs)
    assert {"loss_neck_obj", "loss_neck_bg", "loss_cls_pos", "loss_cls_neg"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_neck_obj"] > 0 and losses["loss_neck_bg"] > 0  # boxes on the shared levels
    sum(losses.values()).backward()
    adapters = dist.neck_adapters.convs
    assert len(adapters) == len(pairs) and all(c.weight.grad is not None for c in adapters)


def test_mobilenet_neck_loss_reads_the_teachers_p5_and_p6_only(v2_teacher, batch):
    t_spec, outs = v2_teacher
    s_spec = _small("mobilenet_v3_fpn")
    torch.manual_seed(1)
    student = build_detector(s_spec, NUM_CLASSES).train()
    dist = build_distiller(load_preset("defeat", PRESET), s_spec, TeacherFacts.of_spec(t_spec))
    images, targets = batch
    out = detector_forward(student, images, [dict(t) for t in targets])
    boxes = [t["boxes"] for t in targets]

    def neck(teacher_outs):
        with torch.no_grad():
            terms = dist.neck_losses(student, out, teacher_outs, boxes, torch.device("cpu"))
        return {k: float(v) for k, v in terms.items()}

    def with_level(level: int, value: float):
        return [replace(o, features=[f.clone().fill_(value) if i == level else f for i, f in enumerate(o.features)])
                for o in outs]

    reference = neck(outs)
    for unused in (0, 1, 2):  # P2-P4: no student level at their strides
        assert neck(with_level(unused, 7.0)) == reference
    for used in (3, 4):  # P5 (for P5a and P5) and P6
        changed = neck(with_level(used, 7.0))
        assert changed["loss_neck_obj"] != reference["loss_neck_obj"]
        assert changed["loss_neck_bg"] != reference["loss_neck_bg"]


def test_other_feature_kd_uses_the_same_pairs(v2_teacher, batch):
    """PKD (distill/feature_kd.py) on a MobileNetV3 student: its finest `levels`
    are the paired levels, so it imitates the teacher's P5 (twice) and P6, never P2-P4."""
    t_spec, outs = v2_teacher
    s_spec = _small("mobilenet_v3_fpn")
    torch.manual_seed(1)
    student = build_detector(s_spec, NUM_CLASSES).train()
    dist = build_distiller(load_preset("pkd", PRESET[1:]), s_spec, TeacherFacts.of_spec(t_spec))
    assert "pkd" in dist.parts and len(dist.feature_align.convs) == 3
    images, targets = batch
    out = detector_forward(student, images, [dict(t) for t in targets])
    boxes = [t["boxes"] for t in targets]

    def pkd(teacher_outs):
        with torch.no_grad():
            return float(dist.feature_kd_losses(out, teacher_outs, boxes, torch.device("cpu"))["loss_pkd"])

    reference = pkd(outs)
    assert reference > 0
    p2_changed = [replace(o, features=[f.clone().fill_(3.0) if i == 0 else f for i, f in enumerate(o.features)])
                  for o in outs]
    assert pkd(p2_changed) == reference
    p6_changed = [replace(o, features=[f * torch.linspace(-1, 2, f.shape[-1]) if i == 4 else f
                                       for i, f in enumerate(o.features)]) for o in outs]
    assert pkd(p6_changed) != reference


def test_mobilenet_student_trains_from_a_resnet_teachers_cache(tmp_path, tiny_cache, tiny_shapes):
    """The cache path: the tiny ResNet teacher's cache (P2-P6, by level names) drives a MobileNetV3
    student (same preprocessing) for two iterations; its three levels learn from the cached P5, P5, P6."""
    import math

    from defeat_cache.engine.train import train

    from builders import TINY_FRCNN, tiny_train_options, write_model_toml
    from checks import run_metrics
    config = copy.deepcopy(load_model_spec("mobilenet_v3_fpn").config)
    config["input"] = dict(TINY_FRCNN["input"])  # the cache's preprocessing
    config["backbone"]["norm"] = "bn"
    config["rpn"], config["roi"] = dict(TINY_FRCNN["rpn"]), dict(TINY_FRCNN["roi"])
    student = write_model_toml(tmp_path / "mbv3_tiny.toml", config)
    run = tmp_path / "run"
    summary = train(tiny_train_options(student, tiny_shapes, run, cache=tiny_cache(),
                                       distill=load_preset("defeat", ["neck.finest_scale=4"])))
    assert summary["iterations"] == 2
    for line in run_metrics(run):
        assert {"loss_neck_obj", "loss_neck_bg", "loss_cls_pos", "loss_cls_neg"} <= set(line)
        assert all(math.isfinite(line[k]) for k in ("loss_neck_obj", "loss_neck_bg", "loss"))
