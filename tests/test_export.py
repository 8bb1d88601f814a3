"""The student out: export -> plain torchvision, load_detector on raw images, predict, eval --detections."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from pycocotools.coco import COCO

from builders import write_model_toml
from defeat_cache.cli import main
from defeat_cache.data.dataset import load_dataset, read_image
from defeat_cache.engine.evaluate import predict
from defeat_cache.errors import UserError
from defeat_cache.models.checkpoint import load_trained, save_checkpoint, trained_model_payload
from defeat_cache.models.zoo import build_detector, load_model_spec


def _invoke(args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r


def _same_detections(a: dict, b: dict, atol: float = 1e-3):
    assert len(a["boxes"]) == len(b["boxes"]) > 0
    order_a, order_b = a["scores"].argsort(descending=True), b["scores"].argsort(descending=True)
    torch.testing.assert_close(a["boxes"][order_a], b["boxes"][order_b], rtol=0, atol=atol)
    torch.testing.assert_close(a["scores"][order_a], b["scores"][order_b], rtol=0, atol=atol / 10)
    assert torch.equal(a["labels"][order_a], b["labels"][order_b])


def test_export_loads_in_plain_torchvision(tmp_path):
    """r50_fpn's architecture is torchvision's fasterrcnn_resnet50_fpn: the README's three lines give
    the same detections as our own model on raw images (sizes that need no resize: torchvision's
    resize rounds sizes down, ours to nearest)."""
    import torchvision

    toml = write_model_toml(tmp_path / "r50_small.toml", load_model_spec("r50_fpn").config,
                            input={"min_size": 128, "max_size": 192},
                            rpn={"pre_nms_top_n_test": 100, "post_nms_top_n_test": 40})  # a cheap box head
    spec = load_model_spec(str(toml))
    torch.manual_seed(0)
    model = build_detector(spec, 3)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(4)  # spread scores: no ties to reorder
    save_checkpoint(tmp_path / "final.pt", **trained_model_payload(
        spec, 3, ["__background__", "cat", "dog"], spec.preprocessing, 10, model.state_dict(), category_ids=[17, 18]),
        optimizer={"not": "exported"})
    r = _invoke(["export", tmp_path / "final.pt", "--out", tmp_path / "student.pth"])
    assert r.exit_code == 0, r.output
    assert "fasterrcnn_resnet50_fpn" in r.output
    sidecar = json.loads((tmp_path / "student.json").read_text())
    assert sidecar["classes"] == [{"label": 1, "id": 17, "name": "cat"}, {"label": 2, "id": 18, "name": "dog"}]
    assert sidecar["preprocessing"]["min_size"] == 128 and sidecar["model"]["name"] == "r50_small"
    state = torch.load(tmp_path / "student.pth", weights_only=True)
    assert not any("optimizer" in k or "adapter" in k for k in state)

    # the README's lines
    meta = json.load(open(tmp_path / "student.json"))["torchvision"]
    with torch.device("meta"):  # as the README's lines, without the seconds of random initialisation
        tv = getattr(torchvision.models.detection, meta["builder"])(weights=None, weights_backbone=None, **meta["kwargs"]).eval()
    tv.load_state_dict(torch.load(tmp_path / "student.pth", weights_only=True), assign=True)

    from defeat_cache import load_detector
    ours = load_detector(tmp_path / "student.pth")
    assert ours.info.form == "exported student" and ours.info.category_ids == [17, 18]
    torch.manual_seed(1)
    images = [torch.rand(3, 128, 160), torch.rand(3, 160, 128)]
    with torch.no_grad():
        for a, b in zip(tv(images), ours(images)):
            _same_detections(a, b, atol=0.01)  # BatchNorm2d vs FrozenBatchNorm2d: float rounding only


def test_trained_model_preprocesses_raw_images(tiny_trained_checkpoint, tiny_shapes):
    """load_trained / load_detector models resize and normalise raw images as the views do:
    the same detections as evaluation's view pipeline, on images of different sizes."""
    from defeat_cache import load_detector
    data = load_dataset(tiny_shapes, "val")
    model, pre, _ = load_trained(tiny_trained_checkpoint)
    # one image per batch: a batch pads each image to the largest, which changes features near its edges
    by_views = predict(model, data, pre, torch.device("cpu"), batch_size=1, workers=0, show_progress=False)
    loaded = load_detector(tiny_trained_checkpoint)
    sizes = {tuple(read_image(r).shape) for r in data.records}
    assert len(sizes) > 1
    found = 0
    with torch.no_grad():
        for p in by_views:
            raw = read_image(data.records[p["image_index"]])
            for m in (model, loaded):
                out = m([raw])[0]
                if len(p["boxes"]):
                    _same_detections(out, p)
                    found += 1
                else:
                    assert len(out["boxes"]) == 0
                out_float = m([raw.float() / 255])[0]  # torchvision's convention: float in [0, 1]
                assert len(out_float["boxes"]) == len(out["boxes"])
    assert found


def _dataset_with_ids(tmp_path: Path, tiny_shapes: str) -> Path:
    """A copy of the tiny dataset whose category ids are 10, 20, ... (not 1..K)."""
    src = Path(tiny_shapes).parent
    dst = tmp_path / "shapes_ids"
    shutil.copytree(src, dst)
    for ann in (dst / "annotations").glob("*.json"):
        coco = json.loads(ann.read_text())
        for c in coco["categories"]:
            c["id"] *= 10
        for a in coco["annotations"]:
            a["category_id"] *= 10
        ann.write_text(json.dumps(coco))
    return dst / Path(tiny_shapes).name


def test_predict_and_eval_write_coco_results(tmp_path, tiny_trained_checkpoint, tiny_shapes, tiny_model_toml):
    data_toml = _dataset_with_ids(tmp_path, tiny_shapes)
    data = load_dataset(data_toml, "val")
    assert data.category_ids[:3] == [10, 20, 30]
    images = sorted({r.file.parent for r in data.records})
    r = _invoke(["predict", "--checkpoint", tiny_trained_checkpoint, *images, "--out", tmp_path / "dets.json",
                 "--draw", tmp_path / "drawn", "--data", data_toml, "--draw-threshold", 0.0])
    assert r.exit_code == 0, r.output
    dets = json.loads((tmp_path / "dets.json").read_text())
    assert dets and {d["category_id"] for d in dets} <= set(data.category_ids)
    assert {d["image_id"] for d in dets} <= {rec.image_id for rec in data.records}
    gt = COCO()
    gt.dataset = data.coco_gt
    gt.createIndex()
    assert len(gt.loadRes(dets).getAnnIds()) == len(dets)  # valid COCO results against the dataset
    drawn = sorted((tmp_path / "drawn").glob("*.png"))
    assert len(drawn) == len(data.records)
    rec = data.records[0]
    with Image.open(tmp_path / "drawn" / f"{rec.file.stem}.png") as im:
        assert im.size == (rec.width, rec.height)

    # eval: the same detections from every checkpoint form, written with the dataset's ids
    r = _invoke(["eval", "--checkpoint", tiny_trained_checkpoint, "--data", data_toml, "--workers", 0,
                 "--detections", tmp_path / "eval_dets.json", "--json", tmp_path / "metrics.json"])
    assert r.exit_code == 0, r.output
    eval_dets = json.loads((tmp_path / "eval_dets.json").read_text())
    assert len(gt.loadRes(json.loads((tmp_path / "eval_dets.json").read_text())).getAnnIds()) == len(eval_dets) > 0
    assert {d["category_id"] for d in eval_dets} <= set(data.category_ids)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    ck = torch.load(tiny_trained_checkpoint, weights_only=True)
    torch.save({"state_dict": ck["model_state"]}, tmp_path / "wrapped.pth")  # lightning/mmdet-style wrapper
    assert _invoke(["export", tiny_trained_checkpoint, "--out", tmp_path / "student.pth"]).exit_code == 0
    for form in (["--checkpoint", tmp_path / "wrapped.pth", "--model", tiny_model_toml],
                 ["--checkpoint", tmp_path / "student.pth"]):
        r = _invoke(["eval", *form, "--data", data_toml, "--workers", 0, "--detections", tmp_path / "again.json",
                     "--json", tmp_path / "again_metrics.json"])
        assert r.exit_code == 0, r.output
        assert json.loads((tmp_path / "again_metrics.json").read_text())["AP"] == metrics["AP"]
        assert json.loads((tmp_path / "again.json").read_text()) == eval_dets
    r = _invoke(["eval", "--checkpoint", tmp_path / "wrapped.pth", "--data", data_toml])
    assert r.exit_code == 1 and "give --model NAME" in r.output
    r = _invoke(["eval", "--checkpoint", tmp_path / "wrapped.pth", "--model", "r18_fpn_cpu", "--data", data_toml])
    assert r.exit_code == 1 and "Error:" in r.output


def test_load_detector_refusals(tmp_path, tiny_trained_checkpoint, tiny_model_toml):
    from defeat_cache import load_detector
    with pytest.raises(UserError, match="not 'r50_fpn'"):
        load_detector(tiny_trained_checkpoint, "r50_fpn")
    other = write_model_toml(tmp_path / "other.toml", backbone={"fpn_channels": 16})
    ck = torch.load(tiny_trained_checkpoint, weights_only=True)
    torch.save(ck["model_state"], tmp_path / "plain.pth")
    with pytest.raises(UserError, match="do not fit model other"):
        load_detector(tmp_path / "plain.pth", str(other))
    assert load_detector(tmp_path / "plain.pth", str(tiny_model_toml)).info.class_names[1] == "class 1"
