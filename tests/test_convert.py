"""mmdetection / detectron2 converters: every key round-trips, class and anchor rows land where they belong.

The source checkpoints are synthetic: a zoo model's random weights renamed here into the
source's key names and layouts (written independently of the converter, from the sources'
module names), with every class row holding a distinct value, so a wrong rename, a swapped
layer or a wrong class/anchor reorder fails the round trip.
"""

from __future__ import annotations

import functools
import pickle
import re

import numpy as np
import pytest
import torch

from builders import TINY_FRCNN, TINY_RETINA, write_model_toml
from defeat_cache.errors import UserError
from defeat_cache.models.checkpoint import load_weights
from defeat_cache.models.convert import computation_differences, convert_state, recognise
from defeat_cache.models.convert.mapping import NEVER_LOGIT
from defeat_cache.models.zoo import build_detector, load_model_spec

K = 3  # classes besides background: rows 1..3 in torchvision's layout
A_RETINA = 9  # 3 ratios x 3 sizes per location


def _distinct_rows(t: torch.Tensor) -> torch.Tensor:
    """Row r holds values around r (plus noise): any permutation of rows is visible."""
    rows = torch.arange(t.shape[0], dtype=t.dtype).view(-1, *([1] * (t.dim() - 1)))
    return rows + 0.01 * torch.randn_like(t)


@functools.cache
def _random_state(model_name: str) -> tuple[dict, torch.nn.Module]:
    """Random tensors of a zoo model's names and shapes (the model itself on the meta device:
    initialising a ResNet-50 detector's weights takes seconds, drawing them 0.1 s)."""
    gen = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        model = build_detector(model_name, K + 1)
    state = {k: (torch.randn(v.shape, generator=gen) if v.is_floating_point() else torch.zeros(v.shape, dtype=v.dtype))
             for k, v in model.state_dict().items()}
    return state, model


def torchvision_state(model_name: str) -> tuple[dict, torch.nn.Module]:
    """A zoo model's random weights, class rows distinct, background slots as the converters write them."""
    torch.manual_seed(0)
    spec = load_model_spec(model_name)
    base, model = _random_state(model_name)
    state = dict(base)
    if spec.family == "faster_rcnn":
        for part in ("weight", "bias"):
            state[f"roi_heads.box_predictor.cls_score.{part}"] = _distinct_rows(state[f"roi_heads.box_predictor.cls_score.{part}"])
            bp = _distinct_rows(state[f"roi_heads.box_predictor.bbox_pred.{part}"])
            bp[:4] = 0  # torchvision never reads the background's box rows; converters leave zeros
            state[f"roi_heads.box_predictor.bbox_pred.{part}"] = bp
    else:
        for part in ("weight", "bias"):
            key = f"head.classification_head.cls_logits.{part}"
            t = _distinct_rows(state[key]).reshape(A_RETINA, K + 1, *state[key].shape[1:])
            t[:, 0] = NEVER_LOGIT if part == "bias" else 0.0  # the background slot of every anchor
            state[key] = t.reshape(state[key].shape)
            key = f"head.regression_head.bbox_reg.{part}"
            state[key] = _distinct_rows(state[key])
    return state, model


# --------------------------------------------------------------------------------------------
# the sources' layouts, written from their module names
# --------------------------------------------------------------------------------------------


def to_mmdet(tv: dict, family: str) -> dict:
    out = {}
    for k, v in tv.items():
        if k.startswith("backbone.body."):
            out["backbone." + k[len("backbone.body."):]] = v
            if k.endswith("running_var"):  # mmdetection's BatchNorm2d has step counters
                out["backbone." + k[len("backbone.body."):].replace("running_var", "num_batches_tracked")] = \
                    torch.tensor(90000)
        elif m := re.fullmatch(r"backbone\.fpn\.inner_blocks\.(\d)\.0\.(\w+)", k):
            out[f"neck.lateral_convs.{m[1]}.conv.{m[2]}"] = v
        elif m := re.fullmatch(r"backbone\.fpn\.layer_blocks\.(\d)\.0\.(\w+)", k):
            out[f"neck.fpn_convs.{m[1]}.conv.{m[2]}"] = v
        elif m := re.fullmatch(r"backbone\.fpn\.extra_blocks\.p(6|7)\.(\w+)", k):
            out[f"neck.fpn_convs.{int(m[1]) - 3}.conv.{m[2]}"] = v  # P3-P5 are 0-2, P6 3, P7 4
        elif k.startswith("rpn.head."):
            name = {"conv.0.0": "rpn_conv", "cls_logits": "rpn_cls", "bbox_pred": "rpn_reg"}[k[9:].rsplit(".", 1)[0]]
            out[f"rpn_head.{name}.{k.rsplit('.', 1)[1]}"] = v
        elif k.startswith("roi_heads.box_head.fc6."):
            out["roi_head.bbox_head.shared_fcs.0." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("roi_heads.box_head.fc7."):
            out["roi_head.bbox_head.shared_fcs.1." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("roi_heads.box_predictor.cls_score."):
            out["roi_head.bbox_head.fc_cls." + k.rsplit(".", 1)[1]] = torch.cat([v[1:], v[:1]])  # background last
        elif k.startswith("roi_heads.box_predictor.bbox_pred."):
            out["roi_head.bbox_head.fc_reg." + k.rsplit(".", 1)[1]] = v[4:]  # no background slot
        elif m := re.fullmatch(r"head\.(classification|regression)_head\.conv\.(\d)\.0\.(\w+)", k):
            out[f"bbox_head.{'cls' if m[1] == 'classification' else 'reg'}_convs.{m[2]}.conv.{m[3]}"] = v
        elif k.startswith("head.classification_head.cls_logits."):
            per_anchor = v.reshape(A_RETINA, K + 1, *v.shape[1:])[:, 1:]  # sigmoid: no background
            out["bbox_head.retina_cls." + k.rsplit(".", 1)[1]] = per_anchor.reshape(-1, *v.shape[1:])
        elif k.startswith("head.regression_head.bbox_reg."):
            out["bbox_head.retina_reg." + k.rsplit(".", 1)[1]] = v
        else:
            raise AssertionError(f"test does not know {k}")
    return out


def _d2_anchor_order(v: torch.Tensor, rows_per_anchor: int) -> torch.Tensor:
    """torchvision's anchor a = ratio * 3 + size -> detectron2's size * 3 + ratio."""
    blocks = v.reshape(A_RETINA, rows_per_anchor, *v.shape[1:])
    order = [ratio * 3 + size for size in range(3) for ratio in range(3)]
    return blocks[order].reshape(-1, *v.shape[1:])


def to_detectron2(tv: dict, family: str) -> dict:
    first = 2 if family == "faster_rcnn" else 3
    out = {"pixel_mean": torch.tensor([103.53, 116.28, 123.675]).view(3, 1, 1),
           "pixel_std": torch.ones(3, 1, 1)}  # buffers of older files: computed, not learnt
    for k, v in tv.items():
        if k.endswith("num_batches_tracked"):
            continue
        part = k.rsplit(".", 1)[1]
        if k.startswith("backbone.body.conv1."):
            out["backbone.bottom_up.stem.conv1.weight"] = v
        elif k.startswith("backbone.body.bn1."):
            out[f"backbone.bottom_up.stem.conv1.norm.{part}"] = v
        elif m := re.fullmatch(r"backbone\.body\.layer(\d)\.(\d+)\.(\w+)\.(\w+)", k):
            res = f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}"
            if m[3].startswith("conv"):
                out[f"{res}.{m[3]}.weight"] = v
            else:
                out[f"{res}.conv{m[3][2:]}.norm.{m[4]}"] = v
        elif m := re.fullmatch(r"backbone\.body\.layer(\d)\.0\.downsample\.(\d)\.(\w+)", k):
            res = f"backbone.bottom_up.res{int(m[1]) + 1}.0.shortcut"
            out[f"{res}.weight" if m[2] == "0" else f"{res}.norm.{m[3]}"] = v
        elif m := re.fullmatch(r"backbone\.fpn\.(inner|layer)_blocks\.(\d)\.0\.(\w+)", k):
            out[f"backbone.fpn_{'lateral' if m[1] == 'inner' else 'output'}{int(m[2]) + first}.{m[3]}"] = v
        elif m := re.fullmatch(r"backbone\.fpn\.extra_blocks\.(p6|p7)\.(\w+)", k):
            out[f"backbone.top_block.{m[1]}.{m[2]}"] = v
        elif k.startswith("rpn.head."):
            name = {"conv.0.0": "conv", "cls_logits": "objectness_logits", "bbox_pred": "anchor_deltas"}[k[9:].rsplit(".", 1)[0]]
            out[f"proposal_generator.rpn_head.{name}.{part}"] = v
        elif k.startswith("roi_heads.box_head.fc6."):
            out[f"roi_heads.box_head.fc1.{part}"] = v
        elif k.startswith("roi_heads.box_head.fc7."):
            out[f"roi_heads.box_head.fc2.{part}"] = v
        elif k.startswith("roi_heads.box_predictor.cls_score."):
            out[f"roi_heads.box_predictor.cls_score.{part}"] = torch.cat([v[1:], v[:1]])
        elif k.startswith("roi_heads.box_predictor.bbox_pred."):
            out[f"roi_heads.box_predictor.bbox_pred.{part}"] = v[4:]
        elif m := re.fullmatch(r"head\.(classification|regression)_head\.conv\.(\d)\.0\.(\w+)", k):
            out[f"head.{'cls' if m[1] == 'classification' else 'bbox'}_subnet.{2 * int(m[2])}.{m[3]}"] = v
        elif k.startswith("head.classification_head.cls_logits."):
            no_bg = v.reshape(A_RETINA, K + 1, *v.shape[1:])[:, 1:].reshape(-1, *v.shape[1:])
            out[f"head.cls_score.{part}"] = _d2_anchor_order(no_bg, K)
        elif k.startswith("head.regression_head.bbox_reg."):
            out[f"head.bbox_pred.{part}"] = _d2_anchor_order(v, 4)
        else:
            raise AssertionError(f"test does not know {k}")
    return out


def _assert_round_trip(converted: dict, tv: dict):
    assert set(converted) == set(tv)
    for k, v in tv.items():
        assert converted[k].shape == v.shape, k
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(converted[k], v), k


# --------------------------------------------------------------------------------------------
# round trips at the real ResNet-50 key lists and shapes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name,source,to_source", [
    ("r50_fpn_mmdet", "mmdet", to_mmdet), ("r50_retina_mmdet", "mmdet", to_mmdet),
    ("r50_fpn_d2", "detectron2", to_detectron2), ("r50_retina_d2", "detectron2", to_detectron2)])
def test_every_key_round_trips_with_reordered_rows(model_name, source, to_source):
    tv, model = torchvision_state(model_name)
    spec = load_model_spec(model_name)
    src = to_source(tv, spec.family)
    assert recognise(src) == source and recognise(tv) is None
    conv = convert_state(src, source, model.state_dict(), spec.family, spec=spec, channels="rgb")
    assert conv.num_classes == K + 1 and conv.depth == 50
    _assert_round_trip(conv.state, tv)
    assert computation_differences(source, spec) == [] and not conv.notes  # the *_mmdet / *_d2 entries match
    assert set(conv.state) == set(model.state_dict())


def test_class_rows_land_on_their_classes():
    """mmdetection's class c (row c-1, background last) is torchvision's row c; detectron2's RetinaNet
    anchor (size s, ratio r) is torchvision's anchor r*3+s."""
    tv, model = torchvision_state("r50_retina_d2")
    src = to_detectron2(tv, "retinanet")
    w = src["head.cls_score.bias"].clone()
    src["head.cls_score.bias"] = torch.arange(w.numel(), dtype=w.dtype) * 10.0  # d2 row (s*3+r)*K + (c-1)
    conv = convert_state(src, "detectron2", model.state_dict(), "retinanet", channels="rgb")
    bias = conv.state["head.classification_head.cls_logits.bias"].view(A_RETINA, K + 1)
    for size in range(3):
        for ratio in range(3):
            for c in range(1, K + 1):
                assert bias[ratio * 3 + size, c] == ((size * 3 + ratio) * K + c - 1) * 10.0
    assert (bias[:, 0] == NEVER_LOGIT).all()

    tv, model = torchvision_state("r50_fpn_mmdet")
    src = to_mmdet(tv, "faster_rcnn")
    src["roi_head.bbox_head.fc_cls.bias"] = torch.tensor([1.0, 2.0, 3.0, -7.0])  # classes 1..3, background
    conv = convert_state(src, "mmdet", model.state_dict(), "faster_rcnn", channels="rgb")
    assert conv.state["roi_heads.box_predictor.cls_score.bias"].tolist() == [-7.0, 1.0, 2.0, 3.0]


def test_bgr_weights_take_rgb_input_and_mismatches_are_named():
    tv, model = torchvision_state("r50_fpn_d2")
    src = to_detectron2(tv, "faster_rcnn")
    spec = load_model_spec("r50_fpn_d2")
    conv = convert_state(src, "detectron2", model.state_dict(), "faster_rcnn", spec=spec)  # default: BGR
    assert torch.equal(conv.state["backbone.body.conv1.weight"], tv["backbone.body.conv1.weight"].flip(1))
    assert any("BGR" in n for n in conv.notes)
    # the same weights for a torchvision-computing model: said, option by option
    plain = load_model_spec("r50_fpn")
    diffs = computation_differences("detectron2", plain)
    assert any(d.startswith("roi_align.aligned = False") for d in diffs)
    assert any(d.startswith("backbone.stride_in_1x1 = False") for d in diffs)

    target = model.state_dict()
    with pytest.raises(UserError, match=r"not understood: roi_heads\.box_head\.fc3\.weight"):
        convert_state({**src, "roi_heads.box_head.fc3.weight": torch.zeros(2)}, "detectron2", target, "faster_rcnn")
    with pytest.raises(UserError, match=r"model tensors the checkpoint lacks: backbone\.fpn\.inner_blocks\.0\.0\.bias"):
        convert_state({k: v for k, v in src.items() if k != "backbone.fpn_lateral2.bias"}, "detectron2", target,
                      "faster_rcnn")
    with pytest.raises(UserError, match="is a faster_rcnn model; this model is a retinanet model"):
        convert_state(src, "detectron2", target, "retinanet")
    with torch.device("meta"):
        r101 = build_detector("r101_fpn_d2", K + 1).state_dict()
    with pytest.raises(UserError, match="ResNet-50 backbone; this model has ResNet-101"):
        convert_state(src, "detectron2", r101, "faster_rcnn")


def test_mmdet_retinanet_needs_p6_from_c5():
    tv, _ = torchvision_state("r50_retina_mmdet")
    src = to_mmdet(tv, "retinanet")
    with torch.device("meta"):
        p5_model = build_detector("r50_retina", K + 1).state_dict()  # torchvision v1: P6 from P5 (256 channels)
    with pytest.raises(UserError, match=r"shape mismatches: backbone\.fpn\.extra_blocks\.p6\.weight \(256, 2048, 3, 3\)"):
        convert_state(src, "mmdet", p5_model, "retinanet", channels="rgb")


# --------------------------------------------------------------------------------------------
# files: --checkpoint takes them directly; `defeat-cache convert`
# --------------------------------------------------------------------------------------------


def test_checkpoint_option_reads_foreign_files(tmp_path):
    from defeat_cache.models.convert.files import convert_file
    toml = write_model_toml(tmp_path / "tiny.toml", TINY_RETINA, neck={"extra_input": "c5"})
    torch.manual_seed(1)
    ref = build_detector(str(toml), K + 1)
    tv = ref.state_dict()
    src = to_mmdet({k: v for k, v in tv.items()}, "retinanet")
    # mmdetection 3.x files: meta with dataset_meta; 2.x: meta['CLASSES']
    torch.save({"meta": {"dataset_meta": {"classes": ("a", "b", "c")}}, "state_dict": src}, tmp_path / "mm.pth")
    model = build_detector(str(toml), K + 1)
    loaded = load_weights(model, tmp_path / "mm.pth")
    assert (loaded.part, loaded.converted_from) == ("detector", "mmdet")
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    ref.eval(), model.eval()
    with torch.no_grad():
        a, b = ref(images), model(images)
    for x, y in zip(a, b):
        assert torch.equal(x["boxes"], y["boxes"]) and torch.equal(x["labels"], y["labels"])
    summary = convert_file(tmp_path / "mm.pth", "mmdet", str(toml), tmp_path / "out" / "tv.pth")
    assert summary["classes"] == ["a", "b", "c"] and summary["num_classes"] == K + 1
    assert any("neck.relu_before_p7 = True" in n for n in summary["notes"])  # the tiny TOML keeps the ReLU
    written = torch.load(tmp_path / "out" / "tv.pth", weights_only=True)
    assert set(written) == set(tv)
    with pytest.raises(UserError, match="--from detectron2, but the file looks like a mmdet checkpoint"):
        convert_file(tmp_path / "mm.pth", "detectron2", str(toml), tmp_path / "x.pth")

    # detectron2's model zoo: a pickle of numpy arrays under 'model'
    frcnn = write_model_toml(tmp_path / "tiny_frcnn.toml", TINY_FRCNN)
    torch.manual_seed(2)
    ref = build_detector(str(frcnn), K + 1)
    d2 = {k: v.numpy() for k, v in to_detectron2(ref.state_dict(), "faster_rcnn").items()}
    with open(tmp_path / "model_final.pkl", "wb") as f:
        pickle.dump({"model": d2, "__author__": "test"}, f)
    model = build_detector(str(frcnn), K + 1)
    loaded = load_weights(model, tmp_path / "model_final.pkl")
    assert (loaded.part, loaded.converted_from) == ("detector", "detectron2")
    for k, v in ref.state_dict().items():
        if k == "backbone.body.conv1.weight":
            assert torch.equal(model.state_dict()[k], v.flip(1))  # detectron2 weights are BGR by default
        elif not k.endswith("num_batches_tracked") and "bbox_pred" not in k:
            assert torch.equal(model.state_dict()[k], v), k
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"model": {"x": np.zeros(2)}, "f": print}, f)
    with pytest.raises(UserError, match="refusing to load builtins.print"):
        load_weights(model, tmp_path / "evil.pkl")


def test_convert_command(tmp_path):
    from click.testing import CliRunner
    from defeat_cache.cli import main
    toml = write_model_toml(tmp_path / "tiny.toml", TINY_FRCNN)
    torch.manual_seed(3)
    tv = build_detector(str(toml), K + 1).state_dict()
    torch.save({"meta": {"CLASSES": ("a", "b", "c")}, "state_dict": to_mmdet(tv, "faster_rcnn")}, tmp_path / "in.pth")
    r = CliRunner().invoke(main, ["convert", "--from", "mmdet", str(tmp_path / "in.pth"), "--model", str(toml),
                                  "--out", str(tmp_path / "out.pth")])
    assert r.exit_code == 0, r.output
    assert "roi_align.aligned = False" in r.output and "a, b, c" in r.output
    out = torch.load(tmp_path / "out.pth", weights_only=True)
    assert torch.equal(out["roi_heads.box_predictor.cls_score.weight"], tv["roi_heads.box_predictor.cls_score.weight"])
    r = CliRunner().invoke(main, ["convert", "--from", "mmdet", str(tmp_path / "in.pth"), "--model", "r50_fpn_mmdet",
                                  "--out", str(tmp_path / "out2.pth")])
    assert r.exit_code == 1 and "Error: mmdetection checkpoint has a ResNet-18 backbone; --model r50_fpn_mmdet has ResNet-50" in r.output


# --------------------------------------------------------------------------------------------
# the zoo options that compute as the sources do
# --------------------------------------------------------------------------------------------


def test_source_computation_options(tmp_path):
    from torchvision.ops import roi_align
    from defeat_cache.models.zoo import AlignedMultiScaleRoIAlign, UnroundedAnchorGenerator

    # anchors: torchvision rounds the cell anchors, mmdetection/detectron2 do not
    cell = UnroundedAnchorGenerator(((32,),), ((0.5, 1.0, 2.0),)).cell_anchors[0]
    w = 32 / 0.5 ** 0.5
    assert torch.allclose(cell[0], torch.tensor([-w / 2, -w / 4, w / 2, w / 4]))  # 45.25 x 22.63, not 46 x 22
    retina = build_detector(str(write_model_toml(tmp_path / "r.toml", TINY_RETINA, anchors={"round": False},
                                                 neck={"extra_input": "c5", "relu_before_p7": False})), 4).eval()
    sizes = retina.anchor_generator.sizes[0]
    assert sizes[1] == pytest.approx(16 * 2 ** (1 / 3))  # not int(20.16) = 20

    # P6 from C5, P7 straight from P6 (mmdetection)
    extra = retina.backbone.fpn.extra_blocks
    c5 = retina.backbone.body(torch.rand(1, 3, 64, 64))["2"]
    assert extra.p6.in_channels == c5.shape[1] != retina.backbone.fpn.layer_blocks[0][0].out_channels
    with torch.no_grad():
        levels = retina.backbone(torch.rand(1, 3, 64, 64))
        body = retina.backbone.body(torch.rand(1, 3, 64, 64))
    p6 = extra.p6(list(body.values())[-1])
    with torch.no_grad():
        ps, _ = extra([torch.zeros(1)], list(body.values()), [])
        assert torch.allclose(ps[-1], extra.p7(p6)) and not torch.allclose(ps[-1], extra.p7(torch.relu(p6)))
    assert list(levels) == ["0", "1", "2", "p6", "p7"]

    # RoIAlign aligned=True, adaptive sampling (mmdetection, detectron2)
    frcnn = build_detector(str(write_model_toml(tmp_path / "f.toml", roi_align={"aligned": True, "sampling_ratio": 0})), 4)
    pool = frcnn.roi_heads.box_roi_pool
    assert isinstance(pool, AlignedMultiScaleRoIAlign)
    feats = {str(i): torch.rand(1, 4, 64 // 2 ** i, 64 // 2 ** i) for i in range(4)}
    boxes = [torch.tensor([[3.0, 5.0, 20.0, 30.0], [0.0, 0.0, 250.0, 240.0]])]  # small -> P2, large -> P4
    out = pool(feats, boxes, [(256, 256)])
    for row, level in ((0, 0), (1, 2)):
        ref = roi_align(feats[str(level)], [boxes[0][row:row + 1]], 7, spatial_scale=1 / 4 / 2 ** level,
                        sampling_ratio=0, aligned=True)
        assert torch.allclose(out[row:row + 1], ref)
    plain = build_detector(str(write_model_toml(tmp_path / "p.toml")), 4).roi_heads.box_roi_pool
    assert not torch.allclose(plain(feats, boxes, [(256, 256)]), out)

    # stride in the 1x1 convolution (MSRA / caffe-style ResNets): same parameters, same output sizes
    msra = build_detector(str(write_model_toml(tmp_path / "s.toml", TINY_FRCNN,
                                               backbone={"depth": 50, "stride_in_1x1": True})), 4)
    first = msra.backbone.body.layer2[0]
    assert first.conv1.stride == (2, 2) and first.conv2.stride == (1, 1)
    with torch.no_grad():
        shapes = [f.shape for f in msra.backbone.body(torch.rand(1, 3, 64, 96)).values()]
    assert [s[-2:] for s in shapes] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    with pytest.raises(UserError, match="stride_in_1x1 applies to bottleneck ResNets"):
        build_detector(str(write_model_toml(tmp_path / "b.toml", backbone={"stride_in_1x1": True})), 4)
