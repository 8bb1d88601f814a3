"""`defeat-cache plan`: size a cache from a sample before extracting it (cache/plan.py)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from defeat_cache.cache import TeacherCache
from defeat_cache.cache.extract import extract
from defeat_cache.cache.plan import PlanOptions, format_plan, plan_cache
from defeat_cache.cli import main as cli

from builders import random_detector_checkpoint, tiny_extract_options, write_json, write_png


def _coco_layout(root):
    """A COCO-layout folder: annotations/instances_train.json + train2017/*.jpg, images of varied
    sizes, category ids that are not contiguous (3, 7, 90)."""
    sizes = [(80, 60), (64, 96), (100, 72), (72, 72), (90, 64), (60, 110)]
    images, anns = [], []
    for i, (w, h) in enumerate(sizes):
        write_png(root / "train2017" / f"{i:012d}.jpg", w, h, color=(40 * i % 255, 90, 160))
        images.append({"id": 100 + i, "file_name": f"{i:012d}.jpg", "width": w, "height": h})
        anns.append({"id": 1 + i, "image_id": 100 + i, "category_id": (3, 7, 90)[i % 3],
                     "bbox": [5, 6, w / 2, h / 3], "area": w * h / 6, "iscrowd": 0})
    cats = [{"id": c, "name": f"class{c}"} for c in (3, 7, 90)]
    write_json(root / "annotations" / "instances_train.json", {"images": images, "annotations": anns, "categories": cats})
    toml = root / "data.toml"
    toml.write_text('format = "coco"\nname = "coco_layout"\n[train]\n'
                    'annotations = "annotations/instances_train.json"\nimages = "train2017"\n')
    return toml


@pytest.fixture(scope="module")
def coco_layout(tmp_path_factory):
    return _coco_layout(tmp_path_factory.mktemp("coco_layout"))


@pytest.fixture(scope="module")
def coco_teacher(tmp_path_factory, tiny_model_toml, coco_layout):
    return random_detector_checkpoint(tmp_path_factory.mktemp("t") / "t.pt", tiny_model_toml, coco_layout)


def test_plan_predicts_the_extracted_size_and_writes_nothing(tmp_path, tiny_model_toml, coco_layout, coco_teacher):
    out = tmp_path / "would_be" / "cache.zarr"
    p = plan_cache(PlanOptions(teacher=str(tiny_model_toml), checkpoint=str(coco_teacher), data=str(coco_layout),
                               codecs=("fp16", "compact"), proposals=20, pre_nms_top_n=50, sample_images=4,
                               out=str(out)))
    assert not out.exists() and not out.parent.exists()
    assert p["items"] == 12 and p["sample_items"] == 8 and p["free_bytes"] > 0
    assert p["codecs"]["compact"]["total_bytes"] < p["codecs"]["fp16"]["total_bytes"]
    assert all(c["fits_on_out"] for c in p["codecs"].values())
    # the whole extraction stores about what the plan said (the sample is 4 of 6 images)
    real = tmp_path / "real.zarr"
    extract(tiny_extract_options(tiny_model_toml, coco_teacher, coco_layout, real, codec="fp16", items_per_shard=12,
                                 batch_size=8))
    info = TeacherCache(str(real)).inspect()
    assert 0.7 < info["bytes_per_item"] / p["codecs"]["fp16"]["bytes_per_view"] < 1.3
    text = format_plan(p)
    assert "compact" in text and "fp16" in text and "nothing was written" in text


def test_plan_cli_on_shapes(tiny_model_toml, tiny_teacher_checkpoint, tiny_shapes):
    res = CliRunner().invoke(cli, ["plan", "--teacher", str(tiny_model_toml), "--checkpoint", str(tiny_teacher_checkpoint),
                                   "--data", str(tiny_shapes), "--codec", "int8,compact", "--proposals", "20",
                                   "--sample", "3", "--ranks", "4", "--out", "s3://bucket/cache.zarr", "--json"])
    assert res.exit_code == 0, res.output
    p = json.loads(res.output[res.output.index("{"):])
    assert set(p["codecs"]) == {"int8", "compact"} and p["ranks"] == 4 and p["free_bytes"] is None
    assert p["codecs"]["compact"]["options"] == {"step": 2.0}
    assert p["codecs"]["compact"]["side_data_bytes"] > 0 == p["codecs"]["int8"]["side_data_bytes"]


def test_plan_bad_codec_is_a_one_line_error(tiny_model_toml, tiny_teacher_checkpoint, tiny_shapes):
    res = CliRunner().invoke(cli, ["plan", "--teacher", str(tiny_model_toml), "--checkpoint", str(tiny_teacher_checkpoint),
                                   "--data", str(tiny_shapes), "--codec", "fp16,zip"])
    assert res.exit_code == 1 and "--codec 'zip'" in res.output and "Traceback" not in res.output
