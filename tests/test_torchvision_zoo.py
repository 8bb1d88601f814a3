"""Zoo entries that claim a torchvision builder: the same state-dict keys and the same outputs.

Each torchvision builder (weights=None, weights_backbone=None, so nothing is downloaded) gives a
state dict that must load into the zoo model with strict key equality, and both models must
then return the same detections for the same input in eval mode. The input goes through our
ViewTransform on both sides (preprocessing is done by views.py, checked separately against
torchvision's transform parameters). Proposal counts are lowered on both sides alike so the
paper-scale R50 heads run in seconds on a CPU; they change no key and no computation rule.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torchvision.models import detection as tvd

from defeat_cache.models.zoo import ViewTransform, build_detector, load_model_spec

NUM_CLASSES = 5  # not COCO's 91: the class count comes from the dataset

# zoo name -> (torchvision builder, what the zoo TOML must be told to match weights=None)
BUILDERS = {
    "r50_fpn_v2": (tvd.fasterrcnn_resnet50_fpn_v2, {}),
    "r50_retina_v2": (tvd.retinanet_resnet50_fpn_v2, {}),
    # with weights=None torchvision trains BatchNorm; the zoo entry freezes it (torchvision's
    # choice with pretrained weights, whose checkpoint has no BN counters): see the key test below
    "mobilenet_v3_fpn": (tvd.fasterrcnn_mobilenet_v3_large_fpn, {"backbone": {"norm": "bn"}}),
}

FEW_PROPOSALS_TV = {"rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 40}
FEW_PROPOSALS = {"pre_nms_top_n_test": 100, "post_nms_top_n_test": 40}


def _zoo_spec(name: str, overrides: dict):
    spec = load_model_spec(name)
    spec.config = copy.deepcopy(spec.config)
    for section, values in overrides.items():
        spec.config.setdefault(section, {}).update(values)
    if spec.family == "faster_rcnn":
        spec.config.setdefault("rpn", {}).update(FEW_PROPOSALS)
    return spec


def _images():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(3, 64, 96, generator=g)]  # one small image: R50 on a shared CPU


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_torchvision_state_dict_loads_strictly_and_gives_the_same_detections(name):
    builder, overrides = BUILDERS[name]
    torch.manual_seed(0)
    kwargs = FEW_PROPOSALS_TV if "retina" not in name else {}
    tv = builder(weights=None, weights_backbone=None, num_classes=NUM_CLASSES, **kwargs).eval()
    if "retina" in name:  # spread the prior-initialised scores: detections without ties to compare
        with torch.no_grad():
            tv.head.classification_head.cls_logits.bias.normal_(0.0, 2.0)
    spec = _zoo_spec(name, overrides)
    torch.manual_seed(1)  # different random init: only the copied weights can make them agree
    ours = build_detector(spec, NUM_CLASSES).eval()
    theirs_state = tv.state_dict()
    assert list(ours.state_dict()) == list(theirs_state)  # same keys, same order
    ours.load_state_dict(theirs_state, strict=True)
    tv.transform = ViewTransform(spec.preprocessing.size_divisible)
    with torch.no_grad():
        a, b = tv(_images()), ours(_images())
    assert len(a[0]["boxes"]) > 0, "nothing to compare"
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for k in x:
            assert torch.equal(x[k], y[k]), (name, k)
    if "retina" not in name:  # RPN and RoI settings taken over from the builder
        assert ours.rpn.score_thresh == tv.rpn.score_thresh
        assert ours.roi_heads.box_roi_pool.sampling_ratio == tv.roi_heads.box_roi_pool.sampling_ratio
    else:
        assert ours.head.regression_head._loss_type == tv.head.regression_head._loss_type == "giou"


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_zoo_preprocessing_is_torchvisions(name):
    spec = load_model_spec(name)
    builder, _ = BUILDERS[name]
    with torch.device("meta"):
        tv = builder(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
    t, p = tv.transform, spec.preprocessing
    assert (t.min_size, t.max_size, t.size_divisible) == ((p.min_size,), p.max_size, p.size_divisible)
    assert [round(m * 255, 3) for m in t.image_mean] == list(p.mean)
    assert [round(s * 255, 3) for s in t.image_std] == list(p.std)


def test_mobilenet_zoo_entry_takes_torchvisions_pretrained_layout():
    """The zoo's MobileNet freezes BatchNorm as torchvision's pretrained builder does, so its keys are
    the weights=None builder's without the BatchNorm counters (what the COCO checkpoint holds)."""
    with torch.device("meta"):
        tv = tvd.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
        ours = build_detector("mobilenet_v3_fpn", NUM_CLASSES)
    tv_keys = [k for k in tv.state_dict() if not k.endswith("num_batches_tracked")]
    assert list(ours.state_dict()) == tv_keys
    spec = load_model_spec("mobilenet_v3_fpn")
    assert [(lv.name, lv.stride) for lv in spec.fpn_levels] == [("p5a", 32), ("p5", 32), ("p6", 64)]
    assert [(s.name, s.channels) for s in spec.backbone_stages] == [("c5a", 160), ("c5", 960)]
    frozen = {n.split(".")[2] for n, p in ours.named_parameters() if not p.requires_grad}
    assert frozen == {str(i) for i in range(7)}  # torchvision freezes features[0..6] for 3 trainable stages


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_export_names_the_torchvision_builder(name):
    """`defeat-cache export` writes the builder and kwargs that rebuild these entries in plain torchvision."""
    from defeat_cache.models.detector import DetectorInfo
    from defeat_cache.models.export import torchvision_builder
    spec = load_model_spec(name)
    info = DetectorInfo(spec, NUM_CLASSES, ["__background__", "a", "b", "c", "d"], [1, 2, 3, 4],
                        spec.preprocessing, "training checkpoint")
    built = torchvision_builder(info)
    assert built["builder"] == BUILDERS[name][0].__name__
    assert built["kwargs"]["num_classes"] == NUM_CLASSES and built["kwargs"]["min_size"] == 800


def test_exported_mobilenet_student_loads_in_plain_torchvision(tmp_path):
    """The deployable student end to end: export, torchvision's own builder from the sidecar, same detections."""
    import json

    from defeat_cache import load_detector
    from defeat_cache.models.checkpoint import save_checkpoint, trained_model_payload
    from defeat_cache.models.export import export_student

    from builders import write_model_toml
    toml = write_model_toml(tmp_path / "mbv3_small.toml", load_model_spec("mobilenet_v3_fpn").config,
                            input={"min_size": 128, "max_size": 192}, rpn=FEW_PROPOSALS)
    spec = load_model_spec(str(toml))
    torch.manual_seed(0)
    model = build_detector(spec, 3)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(4)  # spread scores: no ties to reorder
    save_checkpoint(tmp_path / "final.pt", **trained_model_payload(
        spec, 3, ["__background__", "cat", "dog"], spec.preprocessing, 10, model.state_dict(), category_ids=[17, 18]))
    export_student(tmp_path / "final.pt", tmp_path / "student.pth")
    meta = json.loads((tmp_path / "student.json").read_text())["torchvision"]
    assert meta["builder"] == "fasterrcnn_mobilenet_v3_large_fpn"
    tv = getattr(tvd, meta["builder"])(weights=None, weights_backbone=None, **meta["kwargs"]).eval()
    tv.load_state_dict(torch.load(tmp_path / "student.pth", weights_only=True), strict=True)
    ours = load_detector(tmp_path / "student.pth")
    torch.manual_seed(1)
    images = [torch.rand(3, 128, 160), torch.rand(3, 160, 128)]  # sizes that need no resize
    with torch.no_grad():
        for a, b in zip(tv(images), ours(images)):
            assert len(a["boxes"]) == len(b["boxes"]) > 0
            torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=0.01)  # BN vs frozen BN rounding
            assert torch.equal(a["labels"], b["labels"])
