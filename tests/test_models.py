"""Model zoo, training forward and checkpoint loading."""

from __future__ import annotations

import gc

import pytest
import torch

from defeat_cache.data.records import DataError
from defeat_cache.errors import UserError
from defeat_cache.models.checkpoint import load_weights, read_checkpoint, save_checkpoint
from defeat_cache.models.family import FAMILIES, family_of
from defeat_cache.models.forward import detector_forward
from defeat_cache.models.zoo import (NarrowResNet, ViewTransform, build_detector, count_parameters, list_models,
                                     load_model_spec)

from builders import write_model_toml

FRCNN_LOSSES = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
RETINA_LOSSES = {"classification", "bbox_regression"}

# Published torchvision parameter counts (91 COCO classes, frozen BN as with pretrained weights).
TORCHVISION_PARAMS = {"r50_fpn": 41_755_286, "r50_retina": 34_014_999}


# ------------------------------------------------------------------------------------------------
# zoo
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def zoo_summary() -> dict:
    """Builds every zoo model once (91 classes, no forward) and keeps only what the tests check.

    Built on the meta device: the constructors run in full, but no memory is allocated or
    initialised (the paper-scale models would otherwise take ~15 s on 2 CPU cores).
    """
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    summary = {}
    for name in list_models():
        spec = load_model_spec(name)
        with torch.device("meta"):
            model = build_detector(spec, 91)
        body = model.backbone.body
        resnet = spec.backbone_kind == "resnet"
        summary[name] = {
            "spec": spec,
            "params": count_parameters(model),
            "stage_out": [_stage_out_channels(getattr(body, f"layer{k}")) for k in range(1, 5)] if resnet else None,
            "stem": body.conv1.out_channels if resnet else None,
            "fpn_in": [blk[0].in_channels for blk in model.backbone.fpn.inner_blocks],
            "shapes": {k: tuple(v.shape) for k, v in model.state_dict().items()} if name == "r50_fpn" else None,
            "frozen": sorted({n.split(".")[2] for n, p in model.named_parameters()
                              if n.startswith("backbone.body.") and not p.requires_grad}),
            "transform": type(model.transform),
        }
        del model
        gc.collect()
    with torch.device("meta"):
        tv = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    summary["torchvision_r50_fpn_shapes"] = {k: tuple(v.shape) for k, v in tv.state_dict().items()
                                            if not k.endswith("num_batches_tracked")}
    return summary


def _stage_out_channels(layer: torch.nn.Sequential) -> int:
    last = layer[-1]
    return (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels


def test_zoo_lists_the_configs():
    names = list_models()
    assert names == sorted(names)
    assert {"r18q_fpn_cpu", "r18_fpn_cpu", "r18_retina_cpu", "r50_fpn", "r50q_fpn", "r50_retina",
            "r101_fpn", "r152_fpn", "r152_retina"} <= set(names)


def test_every_zoo_model_builds(zoo_summary):
    for name in list_models():
        s = zoo_summary[name]
        assert s["params"] > 1_000_000, name
        assert s["transform"] is ViewTransform, name
        assert s["fpn_in"] == s["spec"].backbone_channels, name
        if s["spec"].backbone_kind != "resnet":
            continue  # MobileNetV3: test_torchvision_zoo.py compares it with torchvision's builder
        returned = s["stage_out"] if s["spec"].family == "faster_rcnn" else s["stage_out"][1:]  # C2-C5 / C3-C5
        assert returned == s["spec"].backbone_channels, name
        trainable = s["spec"].config["backbone"].get("trainable_layers", 5)
        # frozen BN has no parameters; trained BN's stem bn1 freezes with conv1 (as torchvision)
        stem = ["bn1", "conv1"] if s["spec"].config["backbone"].get("norm", "frozen_bn") == "bn" else ["conv1"]
        assert s["frozen"] == {3: stem + ["layer1"], 5: []}[trainable], name
    # bigger backbones, more parameters
    assert zoo_summary["r18q_fpn_cpu"]["params"] < zoo_summary["r18_fpn_cpu"]["params"] \
        < zoo_summary["r50_fpn"]["params"] < zoo_summary["r101_fpn"]["params"] < zoo_summary["r152_fpn"]["params"]


def test_r50_models_match_torchvision(zoo_summary):
    for name, n in TORCHVISION_PARAMS.items():
        assert zoo_summary[name]["params"] == n, name
    # same module names and shapes as torchvision's fasterrcnn_resnet50_fpn: its weights load as-is
    assert zoo_summary["r50_fpn"]["shapes"] == zoo_summary["torchvision_r50_fpn_shapes"]


def test_quarter_width_models_have_quarter_stage_channels(zoo_summary):
    for narrow, full in (("r50q_fpn", "r50_fpn"), ("r18q_fpn_cpu", "r18_fpn_cpu")):
        n, f = zoo_summary[narrow], zoo_summary[full]
        assert n["stage_out"] == [c // 4 for c in f["stage_out"]], narrow
        assert n["stem"] == f["stem"] // 4 == 16
    assert zoo_summary["r50_fpn"]["stage_out"] == [256, 512, 1024, 2048]
    assert zoo_summary["r50q_fpn"]["stage_out"] == [64, 128, 256, 512]
    assert zoo_summary["r18q_fpn_cpu"]["stage_out"] == [16, 32, 64, 128]


def test_default_lr_is_the_papers_at_batch_32():
    """Without --lr: 0.04 for Faster R-CNN FPN and 0.02 for RetinaNet at the paper's batch 32
    (docs/method.md); a model TOML's [train] lr_per_image wins (the CPU-scale models)."""
    from defeat_cache.engine.schedule import plan_schedule
    from defeat_cache.models.zoo import load_model_spec

    def lr(name: str) -> float:
        spec = load_model_spec(name)
        return plan_schedule(3200, 32, epochs=1, schedule=1.0, max_iters=None, lr=None,
                             lr_per_image=spec.lr_per_image).lr

    assert lr("r50_fpn") == pytest.approx(0.04) and lr("r152_fpn") == pytest.approx(0.04)
    assert lr("r50_retina") == pytest.approx(0.02) and lr("r50_retina_mmdet") == pytest.approx(0.02)
    assert lr("r18_retina_cpu") == pytest.approx(0.005 * 32)


def test_unknown_model_and_bad_family(tmp_path):
    with pytest.raises(DataError, match="unknown model 'r9000'"):
        load_model_spec("r9000")
    bad = write_model_toml(tmp_path / "bad.toml", family="yolo")
    with pytest.raises(DataError, match="family"):
        load_model_spec(str(bad))
    depth = write_model_toml(tmp_path / "depth.toml", backbone={"depth": 19})
    with pytest.raises(DataError, match="depth"):
        build_detector(str(depth), 3)


def test_model_toml_path(tiny_model_toml):
    spec = load_model_spec(str(tiny_model_toml))
    assert spec.name == "tiny_frcnn" and spec.family == "faster_rcnn"
    assert (spec.preprocessing.min_size, spec.preprocessing.max_size) == (64, 96)
    assert spec.backbone_channels == [16, 32, 64, 128] and spec.fpn_channels == 32


def test_family_levels_and_stages_on_the_spec(tiny_model_toml, tiny_retina_toml):
    frcnn, retina = load_model_spec(str(tiny_model_toml)), load_model_spec(str(tiny_retina_toml))
    assert [(lv.name, lv.stride, lv.channels) for lv in frcnn.fpn_levels] == \
        [("p2", 4, 32), ("p3", 8, 32), ("p4", 16, 32), ("p5", 32, 32), ("p6", 64, 32)]
    assert [(lv.name, lv.stride) for lv in retina.fpn_levels] == \
        [("p3", 8), ("p4", 16), ("p5", 32), ("p6", 64), ("p7", 128)]
    assert frcnn.strides == [4, 8, 16, 32, 64] and retina.strides == [8, 16, 32, 64, 128]
    assert [(s.name, s.stride, s.channels) for s in frcnn.backbone_stages] == \
        [("c2", 4, 16), ("c3", 8, 32), ("c4", 16, 64), ("c5", 32, 128)]
    assert [(s.name, s.channels) for s in retina.backbone_stages] == [("c3", 32), ("c4", 64), ("c5", 128)]
    assert retina.backbone_channels == [32, 64, 128]
    # a cache stores C3-C5 for both families (docs/method.md#backbone-distillation)
    assert frcnn.cached_backbone_stages == retina.cached_backbone_stages == retina.backbone_stages
    assert frcnn.has_roi_head and not retina.has_roi_head
    assert sorted(FAMILIES) == ["faster_rcnn", "retinanet"]


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------

def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, 64, 85, generator=g), torch.randn(3, 96, 64, generator=g)]
    targets = [{"boxes": torch.tensor([[5.0, 6.0, 40.0, 50.0], [50.0, 10.0, 80.0, 30.0]]),
                "labels": torch.tensor([1, 2])},
               {"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([3])}]
    return images, targets


def _train_mode_detector(which: str, frcnn_toml, retina_toml):
    torch.manual_seed(0)
    return build_detector(str(frcnn_toml if which == "frcnn" else retina_toml), 4).train()


@pytest.mark.parametrize("which", ["frcnn", "retina"])
def test_train_forward_losses(which, tiny_model_toml, tiny_retina_toml):
    model = _train_mode_detector(which, tiny_model_toml, tiny_retina_toml)
    images, targets = _batch()
    out = detector_forward(model, images, targets)
    assert set(out.losses) == (FRCNN_LOSSES if which == "frcnn" else RETINA_LOSSES)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.losses.values())
    sum(out.losses.values()).backward()
    assert model.backbone.body.conv1.weight.grad is not None
    assert out.images.tensors.shape == (2, 3, 96, 96)
    assert out.images.image_sizes == [(64, 85), (96, 64)]
    strides = [4, 8, 16, 32, 64] if which == "frcnn" else [8, 16, 32, 64, 128]
    assert [tuple(f.shape[-2:]) for f in out.fpn.values()] == [(-(-96 // s), -(-96 // s)) for s in strides]
    assert all(f.shape[1] == 32 for f in out.fpn.values())
    assert [b.shape[1] for b in out.body] == ([16, 32, 64, 128] if which == "frcnn" else [32, 64, 128])
    # the spec describes the maps the built model returns, in order
    spec = load_model_spec(str(tiny_model_toml if which == "frcnn" else tiny_retina_toml))
    assert family_of(model) is spec.family_record
    assert [(lv.stride, lv.channels) for lv in spec.fpn_levels] == [(s, f.shape[1]) for s, f in zip(strides, out.fpn.values())]
    assert [s.channels for s in spec.backbone_stages] == [b.shape[1] for b in out.body]
    assert [tuple(b.shape[-2:]) for b in out.body] == [(96 // s.stride, 96 // s.stride) for s in spec.backbone_stages]


@pytest.mark.parametrize("which", ["frcnn", "retina"])
def test_detector_forward_equals_model_forward(which, tiny_model_toml, tiny_retina_toml):
    model = _train_mode_detector(which, tiny_model_toml, tiny_retina_toml)
    images, targets = _batch()
    torch.manual_seed(123)
    ours = detector_forward(model, images, [dict(t) for t in targets]).losses
    torch.manual_seed(123)
    theirs = model(images, [dict(t) for t in targets])
    assert set(ours) == set(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), (k, ours[k], theirs[k])


def test_eval_forward_returns_detections(tiny_model_toml):
    torch.manual_seed(0)
    model = build_detector(str(tiny_model_toml), 4).eval()
    images, _ = _batch()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for o, im in zip(out, images):
        assert set(o) == {"boxes", "scores", "labels"}
        assert len(o["boxes"]) <= 20
        if len(o["boxes"]):  # boxes stay inside the unpadded image: the transform did not resize
            assert float(o["boxes"][:, 2].max()) <= im.shape[2] and float(o["boxes"][:, 3].max()) <= im.shape[1]


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------

def _tiny(toml, seed: int, num_classes: int = 4):
    torch.manual_seed(seed)
    return build_detector(str(toml), num_classes)


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("wrap", ["plain", "model_state", "ddp"])
def test_load_full_detector_state_dict(tmp_path, tiny_model_toml, wrap):
    src, dst = _tiny(tiny_model_toml, 0), _tiny(tiny_model_toml, 1)
    state = src.state_dict()
    if wrap == "model_state":
        state = {"model_state": state, "iteration": 3}
    elif wrap == "ddp":
        state = {f"module.{k}": v for k, v in state.items()}
    torch.save(state, tmp_path / "w.pt")
    assert load_weights(dst, tmp_path / "w.pt").part == "detector"
    _assert_same_state(src, dst)


def _imagenet_dict(toml, seed: int = 5, norm_layer=None) -> dict:
    """A torchvision-ImageNet-style ResNet state dict (conv1., layer1..4., fc.) for the tiny backbone."""
    from torchvision.models import resnet

    spec = load_model_spec(str(toml))
    torch.manual_seed(seed)
    net = NarrowResNet(resnet.BasicBlock, [2, 2, 2, 2], int(spec.config["backbone"]["width_divisor"]),
                       norm_layer=norm_layer)
    return net.state_dict()


def test_load_imagenet_backbone(tmp_path, tiny_model_toml):
    sd = _imagenet_dict(tiny_model_toml)
    assert {"conv1.weight", "layer1.0.conv1.weight", "fc.weight", "fc.bias"} <= set(sd)
    torch.save(sd, tmp_path / "imagenet.pth")
    model = _tiny(tiny_model_toml, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert load_weights(model, tmp_path / "imagenet.pth").part == "backbone"
    after = model.state_dict()
    for k, v in sd.items():
        if not k.startswith("fc."):
            assert torch.equal(after[f"backbone.body.{k}"], v), k
    for k in before:  # nothing outside the body changed
        if not k.startswith("backbone.body."):
            assert torch.equal(before[k], after[k]), k


def test_load_imagenet_backbone_with_batchnorm_counters_into_frozen_bn(tmp_path, tiny_model_toml):
    frozen = write_model_toml(tmp_path / "frozen.toml", backbone={"norm": "frozen_bn"})
    sd = _imagenet_dict(frozen)  # BatchNorm2d: has *.num_batches_tracked, like torchvision.models.resnet50()
    assert any(k.endswith("num_batches_tracked") for k in sd)
    torch.save(sd, tmp_path / "imagenet.pth")
    model = _tiny(frozen, 0)
    assert load_weights(model, tmp_path / "imagenet.pth").part == "backbone"
    assert torch.equal(model.backbone.body.conv1.weight, sd["conv1.weight"])


def test_mismatched_state_dict_names_the_keys(tmp_path, tiny_model_toml):
    model = _tiny(tiny_model_toml, 0)
    state = model.state_dict()
    state.pop("roi_heads.box_predictor.cls_score.weight")
    state["backbone.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(UserError) as e:
        load_weights(model, tmp_path / "bad.pt")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "bad.pt") in msg
    assert "1 missing keys: roi_heads.box_predictor.cls_score.weight" in msg
    assert "1 unexpected keys: backbone.extra.weight" in msg

    other_classes = _tiny(tiny_model_toml, 0, num_classes=7).state_dict()
    torch.save(other_classes, tmp_path / "classes.pt")
    with pytest.raises(UserError, match="shape mismatches: roi_heads.box_predictor"):
        load_weights(model, tmp_path / "classes.pt")

    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "partial_backbone.pt")
    with pytest.raises(UserError, match="ImageNet backbone weights .*; .*missing keys"):
        load_weights(model, tmp_path / "partial_backbone.pt")


def test_not_a_checkpoint(tmp_path, tiny_model_toml):
    model = _tiny(tiny_model_toml, 0)
    (tmp_path / "text.pt").write_text("hello, I am not a checkpoint\n")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint") as e:
        load_weights(model, tmp_path / "text.pt")
    assert "\n" not in str(e.value)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(UserError, match="got list"):
        read_checkpoint(tmp_path / "list.pt")
    with pytest.raises(UserError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "missing.pt")
    good = tmp_path / "good.pt"
    torch.save(model.state_dict(), good)
    good.write_bytes(good.read_bytes()[:1000])  # truncated
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(good)


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, iteration=1, weights=torch.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no .partial left behind
    save_checkpoint(path, iteration=2, weights=torch.arange(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert read_checkpoint(path)["iteration"] == 2

    real_save = torch.save

    def crash(obj, f, *a, **k):  # writes half a file, then dies
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:
            fh.truncate(10)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, iteration=3, weights=torch.arange(5))
    monkeypatch.undo()
    ck = read_checkpoint(path)  # the previous checkpoint is intact
    assert ck["iteration"] == 2 and torch.equal(ck["weights"], torch.arange(4))
