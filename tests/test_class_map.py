"""Class maps: torchvision's 91 COCO-id slots onto a COCO-category dataset, and heads of other classes.

The dataset has three COCO categories with non-contiguous ids (person 1, dog 18, chair 62), so
the contiguous labels 1, 2, 3 stand for slots 1, 18, 62 of a COCO head.
"""

from __future__ import annotations

import pytest
import torch

from defeat_cache.cache.extract import _prepare_teacher
from defeat_cache.data.dataset import load_dataset
from defeat_cache.errors import UserError
from defeat_cache.models.checkpoint import load_weights
from defeat_cache.models.class_map import COCO_SLOTS, coco_categories
from defeat_cache.models.zoo import build_detector

from builders import write_json, write_png

COCO_SUBSET = [{"id": 62, "name": "chair"}, {"id": 1, "name": "person"}, {"id": 18, "name": "Dog"}]


def _dataset(root, categories) -> object:
    images = [{"id": 1, "file_name": "a.png", "width": 96, "height": 64},
              {"id": 2, "file_name": "b.png", "width": 64, "height": 80}]
    for im in images:
        write_png(root / "images" / im["file_name"], im["width"], im["height"])
    anns = [{"id": 1, "image_id": 1, "category_id": categories[0]["id"], "bbox": [5, 5, 30, 30], "area": 900,
             "iscrowd": 0}]
    write_json(root / "ann.json", {"images": images, "annotations": anns, "categories": categories})
    (root / "data.toml").write_text('format = "coco"\n[train]\nannotations = "ann.json"\nimages = "images"\n')
    return load_dataset(root / "data.toml", "train")


@pytest.fixture
def coco_subset(tmp_path):
    return _dataset(tmp_path / "coco_subset", COCO_SUBSET)


def _coco_head_checkpoint(path, toml, favoured_slot: int, seed: int = 0):
    """A 91-slot detector whose classifier prefers `favoured_slot` on every RoI / anchor, with a
    distinct value in every class row of the box regressor (a wrong reorder shows)."""
    torch.manual_seed(seed)
    model = build_detector(str(toml), COCO_SLOTS)
    state = model.state_dict()
    if "roi_heads.box_predictor.cls_score.bias" in state:
        state["roi_heads.box_predictor.cls_score.weight"].zero_()
        bias = torch.full((COCO_SLOTS,), -5.0)
        bias[favoured_slot] = 5.0
        state["roi_heads.box_predictor.cls_score.bias"] = bias
        state["roi_heads.box_predictor.bbox_pred.bias"] = torch.arange(4 * COCO_SLOTS, dtype=torch.float32)
    else:
        a = model.head.classification_head.num_anchors
        state["head.classification_head.cls_logits.weight"].zero_()
        bias = torch.full((a, COCO_SLOTS), -8.0)
        bias[:, favoured_slot] = 4.0
        state["head.classification_head.cls_logits.bias"] = bias.flatten()
    torch.save({"model": state, "epoch": 25}, path)
    return path


@pytest.mark.parametrize("which", ["frcnn", "retina"])
def test_a_biased_coco_slot_predicts_its_dataset_category(which, tmp_path, coco_subset, tiny_model_toml,
                                                        tiny_retina_toml, capsys):
    toml = tiny_model_toml if which == "frcnn" else tiny_retina_toml
    ck = _coco_head_checkpoint(tmp_path / "coco91.pth", toml, favoured_slot=18)  # COCO "dog"
    assert coco_subset.category_ids == [1, 18, 62]
    model = build_detector(str(toml), coco_subset.num_classes)
    loaded = load_weights(model, ck, classes=coco_subset)
    assert len(loaded.notes) == 1 and "91 COCO-category-id class slots" in loaded.notes[0]
    if which == "frcnn":  # the regressor's 4-row groups follow their classes: slots 0, 1, 18, 62
        rows = model.state_dict()["roi_heads.box_predictor.bbox_pred.bias"].view(-1, 4)[:, 0]
        assert rows.tolist() == [0.0, 4.0, 72.0, 248.0]
    model.eval()
    with torch.no_grad():
        dets = model([torch.randn(3, 64, 96), torch.randn(3, 80, 64)])
    labels = torch.cat([d["labels"] for d in dets])
    assert len(labels) > 0 and (labels == 2).all()  # contiguous label 2 ...
    assert {coco_subset.category_ids[int(lb) - 1] for lb in labels} == {18}  # ... is dataset category 18


def test_coco_categories_table():
    cats = coco_categories()
    assert len(cats) == 80 and cats[1] == "person" and cats[90] == "toothbrush"
    assert not {12, 26, 29, 30, 45, 66, 68, 69, 71, 83} & set(cats)  # unused COCO ids


def test_ids_of_coco_but_other_names_are_not_mapped(tmp_path, tiny_model_toml):
    data = _dataset(tmp_path / "renamed", [{"id": 1, "name": "person"}, {"id": 3, "name": "truck"}])
    ck = _coco_head_checkpoint(tmp_path / "coco91.pth", tiny_model_toml, favoured_slot=3)
    with pytest.raises(UserError) as e:
        load_weights(build_detector(str(tiny_model_toml), data.num_classes), ck, classes=data)
    msg = str(e.value)
    assert "\n" not in msg and "cannot be a teacher" in msg and "category id 3 is 'truck', COCO's is 'car'" in msg


def test_init_weights_skips_heads_of_other_classes_and_says_which(tmp_path, tiny_model_toml):
    data = _dataset(tmp_path / "voc_like", [{"id": 7, "name": "aeroplane"}, {"id": 9, "name": "bottle"}])
    ck = _coco_head_checkpoint(tmp_path / "coco91.pth", tiny_model_toml, favoured_slot=3)
    source = torch.load(ck, weights_only=True)["model"]
    torch.manual_seed(9)
    model = build_detector(str(tiny_model_toml), data.num_classes)
    init_head = model.roi_heads.box_predictor.cls_score.weight.clone()
    loaded = load_weights(model, ck, classes=data, class_heads="skip")
    assert "skipped the class-dependent heads roi_heads.box_predictor.cls_score, roi_heads.box_predictor.bbox_pred" \
        in str(loaded)
    assert "not COCO's (category id 7 is 'aeroplane', COCO's is 'train')" in str(loaded)
    state = model.state_dict()
    for k, v in source.items():
        if k.startswith("roi_heads.box_predictor."):
            continue
        assert torch.equal(state[k], v), k  # everything else came from the checkpoint
    assert torch.equal(state["roi_heads.box_predictor.cls_score.weight"], init_head)


def test_teacher_of_other_classes_is_refused_by_extract_and_online(tmp_path, tiny_model_toml):
    data = _dataset(tmp_path / "four", [{"id": i, "name": f"thing{i}"} for i in (1, 2, 3, 4, 5)])
    torch.manual_seed(0)
    torch.save(build_detector(str(tiny_model_toml), 3).state_dict(), tmp_path / "three.pth")
    from defeat_cache.models.zoo import load_model_spec
    with pytest.raises(UserError) as e:
        _prepare_teacher(load_model_spec(str(tiny_model_toml)), str(tmp_path / "three.pth"), data, torch.device("cpu"))
    msg = str(e.value)
    assert "\n" not in msg
    assert "the checkpoint's heads have 3 classes, the dataset 6 (5 classes + background)" in msg
    assert "Knowledge distillation compares" in msg and "--init-weights" in msg
