"""Dataset loading: COCO-format quirks, VOC folders, dataset TOMLs, image decoding, fingerprints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from defeat_cache.data.coco import load_coco
from defeat_cache.data.dataset import load_dataset, read_image
from defeat_cache.data.records import DataError

from builders import write_json, write_png


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def _assert_one_line_naming(err: pytest.ExceptionInfo, path: Path | str) -> str:
    msg = str(err.value)
    assert "\n" not in msg, f"not one line: {msg!r}"
    assert str(path) in msg, f"{path} not named in: {msg!r}"
    return msg


def _coco(tmp_path: Path, *, images=None, annotations=None, categories=None,
          name="ann.json", toml_images: str | None = "imgs") -> Path:
    """Writes tmp_path/ds/{data.toml, annotations/NAME, imgs/*} and returns the TOML path.

    Default: two 20x10 images (a.png with one box, b.png without annotations), two categories.
    """
    ds = tmp_path / "ds"
    if images is None:
        write_png(ds / "imgs" / "a.png", 20, 10)
        write_png(ds / "imgs" / "b.png", 16, 12)
        images = [{"id": 1, "file_name": "a.png", "width": 20, "height": 10},
                  {"id": 2, "file_name": "b.png", "width": 16, "height": 12}]
    if annotations is None:
        annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 5, 4], "iscrowd": 0}]
    if categories is None:
        categories = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    write_json(ds / "annotations" / name, {"images": images, "annotations": annotations, "categories": categories})
    lines = ['format = "coco"', 'name = "tiny"', "[train]", f'annotations = "annotations/{name}"']
    if toml_images is not None:
        lines.append(f'images = "{toml_images}"')
    (ds / "data.toml").write_text("\n".join(lines) + "\n")
    return ds / "data.toml"


# ------------------------------------------------------------------------------------------------
# COCO format
# ------------------------------------------------------------------------------------------------

def test_relative_and_absolute_file_names(tmp_path, monkeypatch):
    ds = tmp_path / "ds"
    write_png(ds / "imgs" / "sub" / "rel.png", 20, 10)
    absolute = write_png(tmp_path / "elsewhere" / "abs.png", 16, 12)
    images = [{"id": 1, "file_name": "sub/rel.png", "width": 20, "height": 10},
              {"id": 2, "file_name": str(absolute), "width": 16, "height": 12}]
    _coco(tmp_path, images=images, annotations=[])
    monkeypatch.chdir(tmp_path / "elsewhere")  # paths in the TOML are relative to its folder, not the cwd
    data = load_dataset(Path("..") / "ds" / "data.toml", "train")
    assert [r.file for r in data.records] == [(ds / "imgs" / "sub" / "rel.png").resolve(), absolute]
    for r in data.records:
        assert tuple(read_image(r).shape) == (3, r.height, r.width)


def test_noncontiguous_category_ids_including_zero(tmp_path):
    categories = [{"id": 7, "name": "seven"}, {"id": 0, "name": "zero"}, {"id": 3, "name": "three"}]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [0, 0, 4, 4]},
        {"id": 2, "image_id": 1, "category_id": 0, "bbox": [5, 5, 3, 3]},
        {"id": 3, "image_id": 2, "category_id": 3, "bbox": [1, 1, 6, 6]},
        {"id": 4, "image_id": 2, "category_id": 99, "bbox": [1, 1, 6, 6]},  # unknown: not trained on
    ]
    data = load_dataset(_coco(tmp_path, annotations=annotations,
                              categories=categories), "train")
    assert data.category_ids == [0, 3, 7]  # label i+1 <-> category_ids[i], in id order
    assert data.class_names == ["__background__", "zero", "three", "seven"]
    assert data.num_classes == 4
    assert data.records[0].labels.tolist() == [3, 1]
    assert data.records[1].labels.tolist() == [2]
    for r in data.records:  # labels map back to the dataset's ids
        assert r.labels.dtype == np.int64 and r.labels.min() >= 1
    assert [data.category_ids[lab - 1] for lab in data.records[0].labels] == [7, 0]
    assert data.dropped == {"with unknown category_id": 1}


def test_images_without_annotations_are_kept(tmp_path):
    data = load_dataset(_coco(tmp_path), "train")
    assert [r.image_id for r in data.records] == [1, 2]
    empty = data.records[1]
    assert empty.boxes.shape == (0, 4) and empty.boxes.dtype == np.float32
    assert empty.labels.shape == (0,) and empty.labels.dtype == np.int64
    assert empty.ignored_boxes.shape == (0, 4)
    assert "1 images without boxes" in data.summary()


def test_boxes_are_xyxy_in_original_pixels(tmp_path):
    data = load_dataset(_coco(tmp_path), "train")
    np.testing.assert_array_equal(data.records[0].boxes, np.array([[2, 3, 7, 7]], np.float32))
    assert data.records[0].boxes.dtype == np.float32


def test_crowd_boxes_are_ignored_not_trained_on(tmp_path):
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 5, 4], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [0, 0, 10, 8], "iscrowd": 1,
         "segmentation": {"counts": [0, 80], "size": [10, 20]}},
    ]
    data = load_dataset(_coco(tmp_path, annotations=annotations), "train")
    r = data.records[0]
    np.testing.assert_array_equal(r.boxes, [[2, 3, 7, 7]])
    assert r.labels.tolist() == [1]
    np.testing.assert_array_equal(r.ignored_boxes, [[0, 0, 10, 8]])
    assert data.dropped == {"crowd boxes (ignored in training)": 1}
    assert "1 crowd boxes" in data.summary()
    assert len(data.coco_gt["annotations"]) == 2  # evaluation still sees the crowd region


def test_zero_and_negative_size_boxes_are_dropped_and_counted(tmp_path):
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 5, 4]},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [2, 3, 0, 4]},  # zero width
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [2, 3, 4, -2]},  # negative height
        {"id": 4, "image_id": 1, "category_id": 1, "bbox": [2, 3, 0.5, 4]},  # under a pixel
        {"id": 5, "image_id": 1, "category_id": 1, "bbox": [25, 3, 4, 4]},  # outside the 20 px wide image
        {"id": 6, "image_id": 1, "category_id": 2, "bbox": [-3, -2, 8, 6]},  # clipped, still valid
    ]
    data = load_dataset(_coco(tmp_path, annotations=annotations), "train")
    r = data.records[0]
    np.testing.assert_array_equal(r.boxes, [[2, 3, 7, 7], [0, 0, 5, 4]])
    assert r.labels.tolist() == [1, 2]
    assert data.dropped == {"zero/negative-size boxes": 4}


def test_extra_annotation_keys_are_ignored(tmp_path):
    plain = load_dataset(_coco(tmp_path / "plain"), "train")
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 5, 4], "iscrowd": 0,
                    "segmentation": [[2, 3, 7, 3, 7, 7, 2, 7]], "area": 20.0,
                    "keypoints": [3, 4, 2, 5, 5, 1], "num_keypoints": 2, "attributes": {"occluded": True}}]
    extra = load_dataset(_coco(tmp_path / "extra", annotations=annotations), "train")
    np.testing.assert_array_equal(plain.records[0].boxes, extra.records[0].boxes)
    np.testing.assert_array_equal(plain.records[0].labels, extra.records[0].labels)
    assert extra.dropped == {}


def test_missing_width_height_are_read_from_the_image(tmp_path):
    ds = tmp_path / "ds"
    write_png(ds / "imgs" / "a.png", 20, 10)
    write_png(ds / "imgs" / "b.jpg", 33, 17)
    images = [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.jpg", "width": 0, "height": None}]
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [15, 5, 20, 20]}]  # clipped to 20x10
    data = load_dataset(_coco(tmp_path, images=images, annotations=annotations), "train")
    assert [(r.width, r.height) for r in data.records] == [(20, 10), (33, 17)]
    np.testing.assert_array_equal(data.records[0].boxes, [[15, 5, 20, 10]])
    for r in data.records:
        assert tuple(read_image(r).shape) == (3, r.height, r.width)


# --- errors: one line, naming the file ---------------------------------------------------------

def test_error_missing_annotation_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(DataError) as e:
        load_coco(missing, tmp_path, "x", "train")
    assert "not found" in _assert_one_line_naming(e, missing)


def test_error_missing_annotation_file_via_toml(tmp_path):
    (tmp_path / "data.toml").write_text('[train]\nannotations = "ann/train.json"\nimages = "imgs"\n')
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path / "data.toml", "train")
    _assert_one_line_naming(e, tmp_path / "ann" / "train.json")


def test_error_invalid_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [1, 2,\n  "oops"\n')
    with pytest.raises(DataError) as e:
        load_coco(bad, tmp_path, "x", "train")
    assert "not valid JSON" in _assert_one_line_naming(e, bad)


def test_error_json_that_is_a_list(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]))
    with pytest.raises(DataError) as e:
        load_coco(results, tmp_path, "x", "train")
    _assert_one_line_naming(e, results)


def test_error_binary_annotation_file(tmp_path):
    png = write_png(tmp_path / "not_json.png", 8, 8)
    with pytest.raises(DataError) as e:
        load_coco(png, tmp_path, "x", "train")
    _assert_one_line_naming(e, png)


@pytest.mark.parametrize("key", ["images", "categories"])
def test_error_missing_coco_list(tmp_path, key):
    obj = {"images": [], "annotations": [], "categories": []}
    del obj[key]
    path = write_json(tmp_path / "ann.json", obj)
    with pytest.raises(DataError) as e:
        load_coco(path, tmp_path, "x", "train")
    assert f"'{key}'" in _assert_one_line_naming(e, path)


def test_error_relative_file_name_without_images_folder(tmp_path):
    toml = _coco(tmp_path, toml_images=None)
    with pytest.raises(DataError) as e:
        load_dataset(toml, "train")
    msg = _assert_one_line_naming(e, tmp_path / "ds" / "annotations" / "ann.json")
    assert "'a.png'" in msg and "images" in msg


def test_error_unreadable_image_when_size_is_missing(tmp_path):
    ds = tmp_path / "ds"
    (ds / "imgs").mkdir(parents=True)
    (ds / "imgs" / "a.png").write_bytes(b"definitely not an image")
    toml = _coco(tmp_path, images=[{"id": 5, "file_name": "a.png"}], annotations=[])
    with pytest.raises(DataError) as e:
        load_dataset(toml, "train")
    assert "image id 5" in _assert_one_line_naming(e, ds / "imgs" / "a.png")


@pytest.mark.parametrize("content", ["garbage", "truncated", "missing"])
def test_read_image_errors(tmp_path, content):
    toml = _coco(tmp_path)
    data = load_dataset(toml, "train")
    record = data.records[0]
    if content == "garbage":
        record.file.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    elif content == "truncated":
        record.file.write_bytes(record.file.read_bytes()[:40])
    else:
        record.file.unlink()
    with pytest.raises(DataError) as e:
        read_image(record)
    assert "image id 1" in _assert_one_line_naming(e, record.file)


def test_read_image_size_disagreeing_with_annotation(tmp_path):
    ds = tmp_path / "ds"
    write_png(ds / "imgs" / "a.png", 21, 10)  # annotation says 20x10
    images = [{"id": 1, "file_name": "a.png", "width": 20, "height": 10}]
    data = load_dataset(_coco(tmp_path, images=images), "train")
    with pytest.raises(DataError) as e:
        read_image(data.records[0])
    msg = _assert_one_line_naming(e, data.records[0].file)
    assert "21x10" in msg and "20x10" in msg


def test_read_image_converts_grayscale_to_rgb(tmp_path):
    from PIL import Image

    ds = tmp_path / "ds"
    (ds / "imgs").mkdir(parents=True)
    Image.new("L", (20, 10), 77).save(ds / "imgs" / "a.png")
    images = [{"id": 1, "file_name": "a.png", "width": 20, "height": 10}]
    data = load_dataset(_coco(tmp_path, images=images), "train")
    image = read_image(data.records[0])
    assert image.dtype.is_floating_point is False and tuple(image.shape) == (3, 10, 20)
    assert int(image.min()) == int(image.max()) == 77


# ------------------------------------------------------------------------------------------------
# dataset TOML
# ------------------------------------------------------------------------------------------------

def test_toml_missing_split_section(tmp_path):
    toml = _coco(tmp_path)
    with pytest.raises(DataError) as e:
        load_dataset(toml, "val")
    msg = _assert_one_line_naming(e, toml.resolve())
    assert "[val]" in msg and "train" in msg


def test_toml_missing_file_and_bad_toml_and_format(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path / "missing.toml")
    _assert_one_line_naming(e, tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nannotations = 1\n")
    with pytest.raises(DataError) as e:
        load_dataset(bad)
    assert "invalid TOML" in str(e.value)
    other = tmp_path / "other.toml"
    other.write_text('format = "yolo"\n[train]\nannotations = "a.json"\n')
    with pytest.raises(DataError) as e:
        load_dataset(other)
    assert "'yolo'" in _assert_one_line_naming(e, other)
    no_ann = tmp_path / "no_ann.toml"
    no_ann.write_text('[train]\nimages = "imgs"\n')
    with pytest.raises(DataError) as e:
        load_dataset(no_ann)
    assert "annotations" in _assert_one_line_naming(e, no_ann)


# ------------------------------------------------------------------------------------------------
# Pascal VOC
# ------------------------------------------------------------------------------------------------

def _voc_object(name: str, box: tuple[int, int, int, int], difficult: int | None = 0) -> str:
    diff = "" if difficult is None else f"<difficult>{difficult}</difficult>"
    xmin, ymin, xmax, ymax = box
    return (f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated>{diff}"
            f"<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")


def _voc_tree(root: Path, images: dict[str, tuple[int, int, list[str]]], image_set="trainval") -> Path:
    """root/{Annotations,ImageSets/Main,JPEGImages}; images: stem -> (width, height, object xml snippets)."""
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for stem, (w, h, objects) in images.items():
        write_png(root / "JPEGImages" / f"{stem}.jpg", w, h)
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><folder>VOC2007</folder><filename>{stem}.jpg</filename>"
            f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>"
            f"<segmented>0</segmented>{''.join(objects)}</annotation>")
    (root / "ImageSets" / "Main" / f"{image_set}.txt").write_text("".join(f"{s}\n" for s in images))
    return root


@pytest.fixture
def voc_toml(tmp_path) -> Path:
    root = tmp_path / "VOCdevkit" / "VOC2007"
    _voc_tree(root, {
        "000001": (40, 30, [_voc_object("dog", (11, 6, 30, 25)),
                            _voc_object("cat", (1, 1, 10, 10), difficult=1),
                            _voc_object("unicorn", (2, 2, 8, 8))]),
        "000002": (32, 24, [_voc_object("person", (5, 4, 20, 20), difficult=None)]),
        "000003": (24, 24, []),
    })
    toml = tmp_path / "cfg" / "voc.toml"
    toml.parent.mkdir()
    toml.write_text('format = "voc"\nname = "voc07"\n[train]\nroot = "../VOCdevkit/VOC2007"\nimage_set = "trainval"\n')
    return toml


def test_voc_loads_with_difficult_ignored_and_zero_based_boxes(voc_toml):
    from defeat_cache.data.voc import VOC_CLASSES

    data = load_dataset(voc_toml, "train")
    assert data.format == "voc" and data.name == "voc07"
    assert data.class_names == ["__background__", *VOC_CLASSES]
    assert data.category_ids == list(range(1, 21))
    assert [(r.width, r.height) for r in data.records] == [(40, 30), (32, 24), (24, 24)]
    dog, cat, person = (VOC_CLASSES.index(c) + 1 for c in ("dog", "cat", "person"))

    r0 = data.records[0]
    np.testing.assert_array_equal(r0.boxes, [[10, 5, 30, 25]])  # 1-based inclusive -> 0-based continuous
    assert r0.labels.tolist() == [dog]
    np.testing.assert_array_equal(r0.ignored_boxes, [[0, 0, 9, 9]])  # difficult: not trained on
    np.testing.assert_array_equal(data.records[1].boxes, [[4, 3, 20, 20]])  # no <difficult>: not difficult
    assert data.records[1].labels.tolist() == [person]
    assert data.records[2].boxes.shape == (0, 4)

    gt = data.voc_gt
    assert [g["image_id"] for g in gt] == [r.image_id for r in data.records]
    np.testing.assert_array_equal(gt[0]["boxes"], [[10, 5, 29, 24], [0, 0, 9, 9]])
    assert gt[0]["labels"].tolist() == [dog, cat]
    assert gt[0]["difficult"].tolist() == [False, True]
    assert gt[1]["difficult"].tolist() == [False]
    assert data.dropped == {"difficult boxes (ignored in training)": 1, "objects of unknown class": 1}

    # the COCO view for pycocotools: inclusive VOC widths, difficult as crowd (ignored)
    anns = data.coco_gt["annotations"]
    assert [a["bbox"] for a in anns] == [[10, 5, 20, 20], [0, 0, 10, 10], [4, 3, 16, 17]]
    assert [a["iscrowd"] for a in anns] == [0, 1, 0]

    for r in data.records:  # JPEGs decode at the annotated size
        assert tuple(read_image(r).shape) == (3, r.height, r.width)


def test_voc_custom_classes_and_missing_image_set(tmp_path):
    root = _voc_tree(tmp_path / "VOC", {"a": (20, 20, [_voc_object("dog", (2, 2, 10, 10)),
                                                                    _voc_object("cat", (3, 3, 9, 9))])})
    toml = tmp_path / "voc.toml"
    toml.write_text('format = "voc"\nroot = "VOC"\nclasses = ["cat", "dog"]\n'
                    '[train]\nimage_set = "trainval"\n[val]\nimage_set = "test"\n')
    data = load_dataset(toml, "train")
    assert data.class_names == ["__background__", "cat", "dog"]
    assert data.records[0].labels.tolist() == [2, 1]
    with pytest.raises(DataError) as e:
        load_dataset(toml, "val")
    _assert_one_line_naming(e, root / "ImageSets" / "Main" / "test.txt")


def test_voc_unparseable_annotation(tmp_path):
    root = _voc_tree(tmp_path / "VOC", {"a": (20, 20, [])})
    (root / "Annotations" / "a.xml").write_text("<annotation><size>")
    toml = tmp_path / "voc.toml"
    toml.write_text('format = "voc"\n[train]\nroot = "VOC"\nimage_set = "trainval"\n')
    with pytest.raises(DataError) as e:
        load_dataset(toml, "train")
    _assert_one_line_naming(e, root / "Annotations" / "a.xml")


def test_voc_non_finite_box_dropped_and_non_number_refused(tmp_path):
    root = _voc_tree(tmp_path / "VOC", {"a": (20, 20, [_voc_object("dog", ("nan", 2, 10, 10)),
                                                        _voc_object("cat", (3, 3, 9, 9))])})
    toml = tmp_path / "voc.toml"
    toml.write_text('format = "voc"\n[train]\nroot = "VOC"\nimage_set = "trainval"\n')
    data = load_dataset(toml, "train")
    assert data.records[0].labels.tolist() == [8]  # the cat only
    assert data.dropped == {"boxes with non-finite values": 1}
    xml = root / "Annotations" / "a.xml"
    xml.write_text(xml.read_text().replace("<xmin>3</xmin>", "<xmin>three</xmin>"))
    with pytest.raises(DataError) as e:
        load_dataset(toml, "train")
    assert "<bndbox><xmin> must be a number, got 'three'" in _assert_one_line_naming(e, xml)


# ------------------------------------------------------------------------------------------------
# fingerprint
# ------------------------------------------------------------------------------------------------

def test_fingerprint_stable_and_sensitive_to_boxes(tmp_path):
    toml = _coco(tmp_path)
    ann_file = tmp_path / "ds" / "annotations" / "ann.json"
    a, b = load_dataset(toml, "train"), load_dataset(toml, "train")
    assert a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 32

    obj = json.loads(ann_file.read_text())
    obj["info"] = {"description": "irrelevant"}
    obj["annotations"][0]["segmentation"] = [[1, 2, 3, 4]]
    ann_file.write_text(json.dumps(obj))
    assert load_dataset(toml, "train").fingerprint() == a.fingerprint()  # nothing the cache depends on

    obj["annotations"][0]["bbox"][0] += 1
    ann_file.write_text(json.dumps(obj))
    moved = load_dataset(toml, "train").fingerprint()
    assert moved != a.fingerprint()

    obj["annotations"][0]["bbox"][0] -= 1
    obj["annotations"][0]["category_id"] = 2
    ann_file.write_text(json.dumps(obj))
    relabelled = load_dataset(toml, "train").fingerprint()
    assert relabelled not in (a.fingerprint(), moved)

    a.records[0].boxes[0, 3] += 0.5  # in-memory change too
    assert a.fingerprint() != b.fingerprint()


def test_fingerprint_of_tiny_shapes_is_deterministic(tiny_shapes):
    a = load_dataset(tiny_shapes, "train")
    b = load_dataset(tiny_shapes, "train")
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != load_dataset(tiny_shapes, "val").fingerprint()
    assert len(a.records) == 12 and a.num_classes == 9


# ------------------------------------------------------------------------------------------------
# silently wrong data: refused or dropped and reported, never trained on as something else
# ------------------------------------------------------------------------------------------------

def _write_coco_text(tmp_path: Path, text: str) -> Path:
    """Like `_coco`, but the annotation JSON is given as text (so it can hold NaN / Infinity)."""
    toml = _coco(tmp_path)
    (tmp_path / "ds" / "annotations" / "ann.json").write_text(text)
    return toml


def test_non_finite_boxes_are_dropped_and_reported(tmp_path):
    images = ('[{"id": 1, "file_name": "a.png", "width": 20, "height": 10},'
              ' {"id": 2, "file_name": "b.png", "width": 16, "height": 12}]')
    anns = ('[{"id": 7, "image_id": 2, "category_id": 1, "bbox": [NaN, 4, 3, 3]},'
            ' {"id": 8, "image_id": 1, "category_id": 2, "bbox": [1, 2, Infinity, 3]},'
            ' {"id": 9, "image_id": 1, "category_id": 1, "bbox": [2, 3, 5, 4]}]')
    toml = _write_coco_text(tmp_path, f'{{"images": {images}, "annotations": {anns}, '
                                      '"categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}')
    data = load_dataset(toml, "train")
    a, b = data.records
    np.testing.assert_array_equal(a.boxes, [[2, 3, 7, 7]])  # only the finite box
    assert len(b.boxes) == 0  # NaN did not become a full-width box
    summary = data.summary()
    assert "2 boxes with non-finite values (first: image id 2, annotation id 7)" in summary, summary
    assert "\n" not in summary


def test_duplicate_image_ids_are_refused_naming_them(tmp_path):
    ds = tmp_path / "ds"
    for name in ("a.png", "b.png", "c.png", "d.png"):
        write_png(ds / "imgs" / name, 20, 10)
    images = [{"id": i, "file_name": f, "width": 20, "height": 10}
              for i, f in ((3, "a.png"), (5, "b.png"), (3, "c.png"), (5, "d.png"))]
    with pytest.raises(DataError) as e:
        load_dataset(_coco(tmp_path, images=images), "train")
    msg = _assert_one_line_naming(e, ds / "annotations" / "ann.json")
    assert "duplicate image ids" in msg and "3, 5" in msg


def test_annotations_of_unknown_images_are_counted(tmp_path):
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 5, 4]},
            {"id": 4, "image_id": 77, "category_id": 1, "bbox": [2, 3, 5, 4]},
            {"id": 5, "image_id": 78, "category_id": 2, "bbox": [2, 3, 5, 4]}]
    toml = _coco(tmp_path, annotations=anns)
    data = load_dataset(toml, "train")
    summary = data.summary()
    assert "2 annotations whose image_id matches no image (first: annotation id 4, image_id 77)" in summary, summary
    assert [a["id"] for a in data.coco_gt["annotations"]] == [1]  # nor evaluated

    from click.testing import CliRunner
    from defeat_cache.cli import main

    r = CliRunner().invoke(main, ["data", "info", str(toml)])
    assert r.exit_code == 0 and summary in r.stdout.splitlines()


@pytest.mark.parametrize("case", ["category_without_id", "annotation_without_image_id", "image_without_file_name",
                                  "image_without_id", "bbox_of_strings", "bbox_not_a_list"])
def test_coco_field_errors_are_one_line_naming_the_field(tmp_path, case):
    images = annotations = categories = None
    if case == "category_without_id":
        categories, field = [{"id": 1, "name": "cat"}, {"name": "dog"}], "categories[1]"
    elif case == "annotation_without_image_id":
        annotations, field = [{"id": 3, "category_id": 1, "bbox": [2, 3, 5, 4]}], "annotations[0] (id 3)"
    elif case in ("image_without_file_name", "image_without_id"):
        write_png(tmp_path / "ds" / "imgs" / "a.png", 20, 10)
        image = {"id": 4, "width": 20, "height": 10} if case == "image_without_file_name" else \
            {"file_name": "a.png", "width": 20, "height": 10}
        images, field = [image], "images[0]"
    elif case == "bbox_of_strings":
        annotations = [{"id": 3, "image_id": 1, "category_id": 1, "bbox": ["2", "3", "a", "4"]}]
        field = "annotations[0] (id 3)"
    else:
        annotations, field = [{"id": 3, "image_id": 1, "category_id": 1, "bbox": "2,3,5,4"}], "annotations[0] (id 3)"
    toml = _coco(tmp_path, images=images, annotations=annotations, categories=categories)
    with pytest.raises(DataError) as e:
        load_dataset(toml, "train")
    msg = _assert_one_line_naming(e, tmp_path / "ds" / "annotations" / "ann.json")
    assert field in msg, msg
    key = {"category_without_id": "'id'", "annotation_without_image_id": "'image_id'",
           "image_without_file_name": "'file_name'", "image_without_id": "'id'"}.get(case, "bbox")
    assert key in msg, msg


@pytest.mark.parametrize("line, key", [("annotations = 5", "annotations"), ('images = ["a", "b"]', "images")])
def test_toml_wrong_value_type_is_one_line(tmp_path, line, key):
    toml = tmp_path / "data.toml"
    rest = 'images = "imgs"' if key == "annotations" else 'annotations = "a.json"'
    toml.write_text(f"[train]\n{line}\n{rest}\n")
    with pytest.raises(DataError) as e:
        load_dataset(toml, "train")
    msg = _assert_one_line_naming(e, toml)
    assert f"[train] {key}" in msg and "path" in msg, msg


def test_toml_not_utf8_is_one_line(tmp_path):
    toml = tmp_path / "data.toml"
    toml.write_bytes('name = "caf\u00e9"\n[train]\nannotations = "a.json"\n'.encode("latin-1"))
    with pytest.raises(DataError) as e:
        load_dataset(toml, "train")
    assert "UTF-8" in _assert_one_line_naming(e, toml)


def _png16(path: Path, pixels: np.ndarray) -> Path:
    """A 16-bit PNG (grey [H, W] or RGB [H, W, 3] uint16), written by hand: PIL writes no 16-bit RGB."""
    import struct
    import zlib

    h, w = pixels.shape[:2]
    colour = 2 if pixels.ndim == 3 else 0
    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("kind", ["grey16", "rgb16"])
def test_read_image_scales_16_bit_pngs(tmp_path, kind):
    rng = np.random.default_rng(0)
    shape = (10, 20) if kind == "grey16" else (10, 20, 3)
    pixels = rng.integers(0, 65536, size=shape, dtype=np.uint16)
    _png16(tmp_path / "ds" / "imgs" / "a.png", pixels)
    images = [{"id": 1, "file_name": "a.png", "width": 20, "height": 10}]
    data = load_dataset(_coco(tmp_path, images=images), "train")
    image = read_image(data.records[0]).numpy().transpose(1, 2, 0).astype(np.int64)
    expected = pixels.astype(np.int64) * 255 / 65535
    if kind == "grey16":
        expected = np.repeat(expected[..., None], 3, axis=2)
    assert image.shape == (10, 20, 3)
    assert np.abs(image - expected).max() <= 1.0  # scaled, not saturated at 255
    assert (image == 255).mean() < 0.05


@pytest.mark.parametrize("mode", ["P", "LA", "CMYK", "RGBA", "I;16"])
def test_read_image_other_modes_give_8_bit_rgb(tmp_path, mode):
    from PIL import Image

    rgb = Image.new("RGB", (20, 10), (200, 100, 50))
    if mode == "P":
        im = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode == "I;16":
        im = Image.fromarray(np.full((10, 20), 100 * 257, np.uint16))
    else:
        im = rgb.convert(mode)
    path = tmp_path / "ds" / "imgs" / ("a.tif" if mode == "CMYK" else "a.png")
    path.parent.mkdir(parents=True)
    im.save(path)
    images = [{"id": 1, "file_name": path.name, "width": 20, "height": 10}]
    image = read_image(load_dataset(_coco(tmp_path, images=images), "train").records[0])
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 10, 20)
    grey = rgb.convert("L").getpixel((0, 0))
    want = {"I;16": [100] * 3, "LA": [grey] * 3}.get(mode, [200, 100, 50])
    assert np.abs(image[:, 0, 0].numpy().astype(int) - want).max() <= 2


def test_read_image_refuses_float_images(tmp_path):
    from PIL import Image

    path = tmp_path / "ds" / "imgs" / "a.tif"
    path.parent.mkdir(parents=True)
    Image.fromarray(np.full((10, 20), 0.5, np.float32)).save(path)
    images = [{"id": 1, "file_name": "a.tif", "width": 20, "height": 10}]
    record = load_dataset(_coco(tmp_path, images=images), "train").records[0]
    with pytest.raises(DataError) as e:
        read_image(record)
    assert "mode F" in _assert_one_line_naming(e, record.file)
