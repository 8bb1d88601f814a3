"""Tests for the synthetic shapes dataset generator (defeat_cache.data.shapes and its shapes_* modules)."""

from __future__ import annotations

import contextlib
import io
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defeat_cache.data.shapes import CLASSES, EMPTY_EVERY, generate_shapes, render_image
from defeat_cache.data.shapes_render import render_with_owners

NUM_TRAIN, NUM_VAL = 64, 12
MIN_SIDE, MAX_SIDE = 96, 160


def _gen(out: Path, seed: int = 0) -> Path:
    return generate_shapes(out, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=seed,
                           min_side=MIN_SIDE, max_side=MAX_SIDE, progress=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return _gen(tmp_path_factory.mktemp("shapes_a"))


def _load_toml(path: Path) -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)


def _coco(toml_path: Path, split: str):
    from pycocotools.coco import COCO

    cfg = _load_toml(toml_path)
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(toml_path.parent / cfg[split]["annotations"]))


def test_toml_layout_and_paths(dataset: Path):
    assert dataset.name == "data.toml"
    cfg = _load_toml(dataset)
    assert cfg["format"] == "coco"
    assert cfg["name"] == "shapes"
    gen = cfg["generator"]
    assert (gen["seed"], gen["num_train"], gen["num_val"]) == (0, NUM_TRAIN, NUM_VAL)
    assert (gen["min_side"], gen["max_side"]) == (MIN_SIDE, MAX_SIDE)
    root = dataset.parent
    for split, n in (("train", NUM_TRAIN), ("val", NUM_VAL)):
        ann = root / cfg[split]["annotations"]
        img_root = root / cfg[split]["images"]
        assert ann.is_file() and img_root.is_dir()
        d = json.loads(ann.read_text())
        assert len(d["images"]) == n
        for im in d["images"]:
            assert im["file_name"].startswith(f"{split}/")
            path = img_root / im["file_name"]
            assert path.is_file()
            with Image.open(path) as pil:
                assert pil.mode == "RGB"
                assert pil.size == (im["width"], im["height"])


def test_coco_annotations_valid(dataset: Path):
    for split in ("train", "val"):
        coco = _coco(dataset, split)
        cats = coco.loadCats(coco.getCatIds())
        assert [c["id"] for c in cats] == list(range(1, len(CLASSES) + 1))
        assert [c["name"] for c in cats] == list(CLASSES)
        assert len(coco.getAnnIds()) > 0
        ann_ids = [a["id"] for a in coco.dataset["annotations"]]
        assert len(set(ann_ids)) == len(ann_ids)
        for a in coco.dataset["annotations"]:
            im = coco.imgs[a["image_id"]]
            x, y, w, h = a["bbox"]
            assert all(isinstance(v, float) for v in a["bbox"])
            assert w >= 3 and h >= 3
            assert x >= 0 and y >= 0
            assert x + w <= im["width"] and y + h <= im["height"]
            assert a["area"] == pytest.approx(w * h)
            assert a["iscrowd"] == 0
            assert a["category_id"] in coco.cats


def test_all_classes_and_sizes_present(dataset: Path):
    coco = _coco(dataset, "train")
    anns = coco.dataset["annotations"]
    assert {a["category_id"] for a in anns} == set(range(1, len(CLASSES) + 1))
    areas = np.array([a["area"] for a in anns])
    assert (areas < 32 ** 2).any(), "no COCO-small objects"
    assert ((areas >= 32 ** 2) & (areas < 96 ** 2)).any(), "no COCO-medium objects"
    per_image = np.bincount([a["image_id"] for a in anns], minlength=NUM_TRAIN + 1)[1:]
    assert per_image.max() <= 8
    assert per_image.mean() > 2.0


def test_boxes_are_tight_to_visible_pixels():
    n_objects = 0
    for i in range(12):
        arr, objects, owner = render_with_owners(3, "train", i, MIN_SIDE, MAX_SIDE)
        assert owner.shape == arr.shape[:2]
        assert owner.max() == len(objects) - 1
        for k, o in enumerate(objects):
            ys, xs = np.nonzero(owner == k)
            x, y, w, h = o["bbox"]
            assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min())
            assert len(xs) >= 12
        n_objects += len(objects)
    assert n_objects > 20


def test_image_sizes_vary_within_bounds(dataset: Path):
    d = json.loads((dataset.parent / "annotations" / "train.json").read_text())
    ws = {im["width"] for im in d["images"]}
    hs = {im["height"] for im in d["images"]}
    assert min(ws) >= MIN_SIDE and max(ws) <= MAX_SIDE
    assert min(hs) >= MIN_SIDE and max(hs) <= MAX_SIDE
    assert len(ws) > 5 and len(hs) > 5
    assert any(im["width"] != im["height"] for im in d["images"])


def test_empty_images_exist(dataset: Path):
    coco = _coco(dataset, "train")
    empty = [i for i in coco.getImgIds() if not coco.getAnnIds(imgIds=[i])]
    assert len(empty) >= NUM_TRAIN // EMPTY_EVERY
    assert len(empty) < NUM_TRAIN // 4


def test_deterministic_and_seed_dependent(dataset: Path, tmp_path: Path):
    again = _gen(tmp_path / "again")
    other = _gen(tmp_path / "other", seed=1)
    for split in ("train", "val"):
        a = (dataset.parent / "annotations" / f"{split}.json").read_bytes()
        assert a == (again.parent / "annotations" / f"{split}.json").read_bytes()
        assert a != (other.parent / "annotations" / f"{split}.json").read_bytes()
    names = sorted(p.relative_to(dataset.parent) for p in (dataset.parent / "images").rglob("*.png"))
    assert len(names) == NUM_TRAIN + NUM_VAL
    assert names == sorted(p.relative_to(again.parent) for p in (again.parent / "images").rglob("*.png"))
    for rel in names:
        assert (dataset.parent / rel).read_bytes() == (again.parent / rel).read_bytes()
    first = np.asarray(Image.open(dataset.parent / "images/train/000000.png"))
    assert not np.array_equal(first, np.asarray(Image.open(other.parent / "images/train/000000.png")))
    # train and val are drawn independently
    assert not np.array_equal(first, np.asarray(Image.open(dataset.parent / "images/val/000000.png")))


def test_render_image_matches_files(dataset: Path):
    arr, objects = render_image(0, "val", 3, MIN_SIDE, MAX_SIDE)
    assert np.array_equal(arr, np.asarray(Image.open(dataset.parent / "images/val/000003.png")))
    d = json.loads((dataset.parent / "annotations/val.json").read_text())
    anns = [a for a in d["annotations"] if a["image_id"] == d["images"][3]["id"]]
    assert [a["bbox"] for a in anns] == [o["bbox"] for o in objects]


def test_prefix_stable_across_dataset_sizes(dataset: Path, tmp_path: Path):
    small = generate_shapes(tmp_path / "small", num_train=5, num_val=2, seed=0,
                            min_side=MIN_SIDE, max_side=MAX_SIDE, progress=False)
    for rel in ("images/train/000004.png", "images/val/000001.png"):
        assert (small.parent / rel).read_bytes() == (dataset.parent / rel).read_bytes()


def test_idempotent_and_regenerates_on_change(tmp_path: Path):
    out = tmp_path / "ds"
    kw = dict(num_train=4, num_val=2, seed=0, min_side=MIN_SIDE, max_side=MAX_SIDE, progress=False)
    toml_path = generate_shapes(out, **kw)
    files = [toml_path, out / "annotations/train.json", out / "images/train/000003.png"]
    mtimes = [p.stat().st_mtime_ns for p in files]
    assert generate_shapes(str(out), **kw) == toml_path
    assert [p.stat().st_mtime_ns for p in files] == mtimes

    # different parameters: regenerate, stale images removed
    generate_shapes(out, **{**kw, "num_train": 2})
    assert _load_toml(toml_path)["generator"]["num_train"] == 2
    assert sorted(p.name for p in (out / "images/train").iterdir()) == ["000000.png", "000001.png"]
    assert len(json.loads((out / "annotations/train.json").read_text())["images"]) == 2

    # an incomplete dataset (missing images) is regenerated
    (out / "images/train/000001.png").unlink()
    generate_shapes(out, **{**kw, "num_train": 2})
    assert (out / "images/train/000001.png").is_file()


def test_invalid_arguments(tmp_path: Path):
    with pytest.raises(ValueError):
        generate_shapes(tmp_path / "x", num_train=1, num_val=1, min_side=200, max_side=100, progress=False)
