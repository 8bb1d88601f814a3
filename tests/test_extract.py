"""Stage 1: teacher extraction into a cache (defeat_cache.cache.extract, `defeat-cache extract/verify/inspect`).

Everything runs on the tiny models / tiny shapes dataset of conftest.py with a randomly
initialised teacher; extraction uses workers=0 and a few items per shard so several shards exist.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from defeat_cache.cache import CacheMismatchError, CacheWriter, IncompleteCacheError, TeacherCache
from defeat_cache.cache import extract as extract_mod
from defeat_cache.cache import storage as storage_mod
from defeat_cache.cache.extract import ExtractOptions, extract
from defeat_cache.cli import main as cli
from defeat_cache.data.dataset import ViewDataset, load_dataset
from defeat_cache.data.records import DataError
from defeat_cache.models.checkpoint import load_weights
from defeat_cache.models.forward import backbone_features, roi_class_logits
from defeat_cache.models.teacher import teacher_outputs
from defeat_cache.models.zoo import build_detector, load_model_spec
from defeat_cache.views import ViewSet

from builders import DEFAULT_PRE_NMS, random_detector_checkpoint, shapes_dataset, tiny_extract_options
from checks import rel_l2

VIEWS = "orig,hflip"


# ------------------------------------------------------------------------------------ helpers
def _teacher(model_toml, checkpoint, num_classes):
    t = build_detector(str(model_toml), num_classes)
    load_weights(t, checkpoint)
    return t.eval().requires_grad_(False)


def _views_dataset(model_toml, data_toml):
    spec = load_model_spec(str(model_toml))
    data = load_dataset(data_toml, "train")
    return ViewDataset(data, spec.preprocessing, ViewSet.parse(VIEWS)), data


def _arrays(path) -> dict[str, np.ndarray]:
    """Every array of a cache (zarr group) as numpy, by its path."""
    group = zarr.open_group(str(path), mode="r")
    out = {}
    for name, arr in group.arrays():
        out[name] = np.asarray(arr[...])
    for sub in ("features", "backbone"):
        if sub in group:
            for name, arr in group[sub].arrays():
                out[f"{sub}/{name}"] = np.asarray(arr[...])
    return out


def _opts(model_toml, ckpt, data_toml, out, /, **overrides) -> ExtractOptions:
    """This file's extractions: the tiny ones, 3 images a batch and 3 items a shard (16 items: 6 shards)."""
    return tiny_extract_options(model_toml, ckpt, data_toml, out,
                                **{"views": VIEWS, "batch_size": 3, "items_per_shard": 3, **overrides})


@pytest.fixture(scope="module")
def small_shapes(tmp_path_factory) -> Path:
    """8 train images (16 items): the dataset of the resume / corruption tests."""
    return shapes_dataset(tmp_path_factory.mktemp("small_shapes"), num_train=8, num_val=4)


@pytest.fixture(scope="module")
def small_teacher_ckpt(tmp_path_factory, tiny_model_toml, small_shapes) -> Path:
    return random_detector_checkpoint(tmp_path_factory.mktemp("small_teacher") / "t.pt", tiny_model_toml, small_shapes)


@pytest.fixture(scope="module")
def direct(tiny_model_toml, tiny_teacher_checkpoint, tiny_shapes):
    """Per item: the direct single-image teacher forward (teacher_outputs) and the sample it ran on."""
    ds, data = _views_dataset(tiny_model_toml, tiny_shapes)
    teacher = _teacher(tiny_model_toml, tiny_teacher_checkpoint, data.num_classes)
    out = []
    for i in range(len(data.records) * 2):
        s = ds.sample(i // 2, i % 2)
        o = teacher_outputs(teacher, [s["image"]], [s["boxes"]], 20, 50, with_backbone=True)[0]
        out.append((s, o))
    return teacher, out


# ------------------------------------------------------------------------------------ contents
def test_fp32_cache_equals_direct_teacher_forward(tiny_cache, direct, tiny_model_toml):
    path = tiny_cache("fp32")
    assert tiny_cache.proposals == 20 and tiny_cache.pre_nms_top_n == 50  # what `direct` used
    teacher, ref = direct
    cache = TeacherCache(path)
    spec = load_model_spec(str(tiny_model_toml))
    assert len(cache) == len(ref) == 24
    assert cache.layout.num_shards == math.ceil(24 / tiny_cache.items_per_shard) >= 3
    assert [l.name for l in cache.layout.feature_levels] == ["p2", "p3", "p4", "p5", "p6"]
    saw_flip = False
    for i, (s, o) in enumerate(ref):
        it = cache.read(i)
        g = s["geometry"]
        assert (it.image_index, it.view_index) == (i // 2, i % 2)
        assert tuple(it.image_size) == g.image_size and tuple(it.canvas_size) == g.canvas_size
        saw_flip |= g.flip
        # features: every level, at the item's own canvas extent, exact
        assert len(it.features) == 5
        for lvl, (a, b, stride) in enumerate(zip(it.features, o.features, spec.strides)):
            assert a.shape == b.shape, (i, lvl)
            assert a.shape[1:] == (math.ceil(g.canvas_size[0] / stride), math.ceil(g.canvas_size[1] / stride))
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=lambda m: f"item {i} level {lvl}: {m}")
        # proposals / objectness / logits, exact
        assert 0 < len(it.proposals) <= 20
        for name in ("proposals", "objectness", "proposal_logits", "gt_logits"):
            torch.testing.assert_close(getattr(it, name), getattr(o, name), atol=1e-6, rtol=0,
                                       msg=lambda m: f"item {i} {name}: {m}")
        assert it.proposal_logits.shape == (len(it.proposals), 9)
        assert ((it.objectness >= 0) & (it.objectness <= 1)).all()
        # gt rows are the sample's own view boxes (flipped for hflip), in order
        torch.testing.assert_close(it.gt_boxes, s["boxes"], atol=0, rtol=0)
        assert it.gt_logits.shape == (len(s["boxes"]), 9)
        # alignment: logits recomputed for the cached rows (proposals then GT) match row by row
        image_list, _ = teacher.transform([s["image"]])
        fpn, _ = backbone_features(teacher, image_list)
        with torch.no_grad():
            logits = roi_class_logits(teacher, fpn, [torch.cat([it.proposals, it.gt_boxes])], image_list.image_sizes)
        torch.testing.assert_close(torch.cat([it.proposal_logits, it.gt_logits]), logits, atol=1e-5, rtol=1e-5)
    assert saw_flip


@pytest.mark.parametrize("codec,max_err", [("fp16", 1e-3), ("int8", 1e-2)])
def test_lossy_codec_feature_error(tiny_cache, direct, codec, max_err):
    _, ref = direct
    cache = TeacherCache(tiny_cache(codec))
    assert cache.layout.codec == codec
    worst = 0.0
    for i, (s, o) in enumerate(ref):
        it = cache.read(i)
        for lvl, (a, b) in enumerate(zip(it.features, o.features)):
            assert a.shape == b.shape and a.dtype == torch.float32
            worst = max(worst, rel_l2(a, b))
        # boxes and logits are stored as float32 whatever the feature codec
        torch.testing.assert_close(it.proposal_logits, o.proposal_logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(it.gt_logits, o.gt_logits, atol=1e-6, rtol=0)
    assert 0 < worst <= max_err, f"{codec}: worst relative L2 error {worst:.3g}"


def test_backbone_features_equal_teacher_body(tiny_cache, direct):
    teacher, ref = direct
    cache = TeacherCache(tiny_cache("fp32", backbone=True))
    names = [l.name for l in cache.layout.backbone_levels]
    # the stages docs/method.md#backbone-distillation distils must be there (C2 optional), in order
    assert {"c3", "c4", "c5"} <= set(names) <= {"c2", "c3", "c4", "c5"} and names == sorted(names)
    for i in (0, 1, 7, len(ref) - 1):
        s, o = ref[i]
        it = cache.read(i)
        image_list, _ = teacher.transform([s["image"]])
        with torch.no_grad():
            body = {f"c{k + 2}": v[0] for k, v in enumerate(teacher.backbone.body(image_list.tensors).values())}
        assert len(it.backbone_features) == len(names)
        for name, a in zip(names, it.backbone_features):
            torch.testing.assert_close(a, body[name], atol=1e-6, rtol=0, msg=lambda m: f"item {i} {name}: {m}")
        for a, b in zip(it.features, o.features):  # FPN levels unchanged by --backbone
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert TeacherCache(tiny_cache("fp32")).read(0).backbone_features is None


def test_batched_extraction_matches_single_image_forward(tmp_path, tiny_model_toml, small_shapes, small_teacher_ckpt):
    """Batching (images of one canvas share a forward) only changes float rounding."""
    out = tmp_path / "c.zarr"
    extract(_opts(tiny_model_toml, small_teacher_ckpt, small_shapes, out, batch_size=6))
    ds, data = _views_dataset(tiny_model_toml, small_shapes)
    teacher = _teacher(tiny_model_toml, small_teacher_ckpt, data.num_classes)
    cache = TeacherCache(str(out))
    for i in range(len(cache)):
        s = ds.sample(i // 2, i % 2)
        o = teacher_outputs(teacher, [s["image"]], [s["boxes"]], 20, 50)[0]
        it = cache.read(i)
        for a, b in zip(it.features, o.features):
            scale = float(b.abs().max())
            torch.testing.assert_close(a, b, atol=1e-5 * scale, rtol=0)
        torch.testing.assert_close(it.gt_logits, o.gt_logits, atol=1e-4, rtol=1e-4)


def test_cache_does_not_depend_on_loader_workers(tmp_path, tiny_model_toml, small_shapes, small_teacher_ckpt):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # main-process views (workers=0) with 2 intra-op threads, as on this machine
    try:
        extract(_opts(tiny_model_toml, small_teacher_ckpt, small_shapes, tmp_path / "w0.zarr", workers=0, views="orig"))
        extract(_opts(tiny_model_toml, small_teacher_ckpt, small_shapes, tmp_path / "w2.zarr", workers=2, views="orig"))
    finally:
        torch.set_num_threads(threads)
    a, b = _arrays(tmp_path / "w0.zarr"), _arrays(tmp_path / "w2.zarr")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# ------------------------------------------------------------------------------------ resume
class SimulatedKill(RuntimeError):
    pass


def test_resume_after_kill_mid_shard(tmp_path, monkeypatch, tiny_model_toml, small_shapes, small_teacher_ckpt):
    ref_path, path = tmp_path / "ref.zarr", tmp_path / "resumed.zarr"
    summary = extract(_opts(tiny_model_toml, small_teacher_ckpt, small_shapes, ref_path))
    num_shards = math.ceil(16 / 3)
    assert summary["complete"] and summary["written_shards"] == num_shards == 6

    # 1st run dies inside the 3rd shard's write: its feature arrays are on disk, rois/meta and
    # the shard_done marker are not (as a SIGKILL between two assignments would leave it).
    real_set_many = storage_mod.set_many
    calls = {"set_many": 0}

    def dying_set_many(reqs):
        calls["set_many"] += 1
        if calls["set_many"] == 3:
            raise SimulatedKill("simulated kill")
        return real_set_many(reqs)

    monkeypatch.setattr(storage_mod, "set_many", dying_set_many)
    with pytest.raises(SimulatedKill, match="simulated kill"):
        extract(_opts(tiny_model_toml, small_teacher_ckpt, small_shapes, path))
    monkeypatch.setattr(storage_mod, "set_many", real_set_many)

    with pytest.raises(IncompleteCacheError):
        TeacherCache(str(path))
    partial = TeacherCache(str(path), allow_incomplete=True)
    info = partial.inspect()
    assert info["shards_done"] == 2 and info["items_done"] == 6 and not info["complete"]
    with pytest.raises(IncompleteCacheError):
        partial.read(6)  # shard 2 (items 6..8) was being written: never marked, never readable
    assert not partial.verify().ok

    # 2nd run (same command): only the remaining shards are computed and written
    written, computed = [], []
    real_write, real_outputs = CacheWriter.write_shard, extract_mod.teacher_outputs

    def counting_write(self, shard, items):
        written.append(shard)
        return real_write(self, shard, items)

    def counting_outputs(teacher, images, *a, **kw):
        computed.append(len(images))
        return real_outputs(teacher, images, *a, **kw)

    monkeypatch.setattr(CacheWriter, "write_shard", counting_write)
    monkeypatch.setattr(extract_mod, "teacher_outputs", counting_outputs)
    summary = extract(_opts(tiny_model_toml, small_teacher_ckpt, small_shapes, path))
    assert sorted(written) == [2, 3, 4, 5]
    assert summary["written_shards"] == 4 and summary["complete"]
    assert sum(computed) == 16 - 6  # items of shards 0, 1 were not recomputed

    # complete, and array for array what the uninterrupted run wrote
    assert TeacherCache(str(path)).verify().ok
    a, b = _arrays(ref_path), _arrays(path)
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert not list(path.rglob("*.partial"))


def test_rerun_on_complete_cache_is_noop(tmp_path, monkeypatch, tiny_model_toml, small_shapes, small_teacher_ckpt):
    out = tmp_path / "c.zarr"
    args = ["extract", "--teacher", str(tiny_model_toml), "--checkpoint", str(small_teacher_ckpt), "--data",
            str(small_shapes), "--out", str(out), "--codec", "fp32", "--proposals", "20", "--workers", "0",
            "--batch-size", "3", "--items-per-shard", "3"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    first = json.loads(res.stdout.strip().splitlines()[-1])
    assert first["complete"] and first["written_shards"] == 6
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    def boom(*a, **kw):
        raise AssertionError("a complete cache must not build a teacher")

    monkeypatch.setattr(extract_mod, "_prepare_teacher", boom)
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["written_shards"] == 0
    # the same extraction through the API (the CLI has no --pre-nms-top-n: it extracts with the default)
    summary = extract(_opts(tiny_model_toml, small_teacher_ckpt, small_shapes, out, pre_nms_top_n=DEFAULT_PRE_NMS))
    assert summary["written_shards"] == 0 and summary["complete"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_existing_cache_with_other_settings_is_refused(tmp_path, tiny_model_toml, small_shapes, small_teacher_ckpt):
    out = tmp_path / "c.zarr"
    extract(_opts(tiny_model_toml, small_teacher_ckpt, small_shapes, out))
    other_ckpt = random_detector_checkpoint(tmp_path / "other.pt", tiny_model_toml, small_shapes, seed=1)
    for change, key in ((dict(checkpoint=str(other_ckpt)), "teacher_checkpoint_sha256"),
                        (dict(codec="fp16"), "codec"),
                        (dict(proposals=10), "proposals.post_nms_top_n")):
        with pytest.raises(CacheMismatchError, match=key.replace(".", r"\.")):
            extract(_opts(tiny_model_toml, small_teacher_ckpt, small_shapes, out, **change))
    assert TeacherCache(str(out)).verify().ok  # untouched


# ------------------------------------------------------------------------------------ CLI
def test_cli_verify_and_inspect(tmp_path, tiny_cache):
    path = tmp_path / "c.zarr"
    shutil.copytree(tiny_cache("fp32"), path)
    runner = CliRunner()
    res = runner.invoke(cli, ["verify", str(path)])
    assert res.exit_code == 0, res.output
    assert "PROBLEM" not in res.output and "OK" in res.output

    res = runner.invoke(cli, ["inspect", "--json", str(path)])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["items_done"] == info["items_total"] == 24
    assert info["complete"] is True and info["shards_done"] == info["shards_total"]

    shard_files = sorted(p for p in (path / "features" / "p2").rglob("*") if p.is_file() and p.name != "zarr.json")
    assert shard_files
    victim = shard_files[1]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    res = runner.invoke(cli, ["verify", str(path)])
    assert res.exit_code == 1, res.output
    problems = [l for l in res.stdout.splitlines() if l.startswith("PROBLEM")]
    assert problems and any("p2" in l for l in problems), res.stdout
    assert all("shard 1" in l for l in problems), res.stdout  # only the damaged shard is blamed


def test_verify_reports_missing_shard_file(tmp_path, tiny_cache):
    path = tmp_path / "c.zarr"
    shutil.copytree(tiny_cache("fp32"), path)
    shard_files = sorted(p for p in (path / "features" / "p4").rglob("*") if p.is_file() and p.name != "zarr.json")
    shard_files[0].unlink()
    res = CliRunner().invoke(cli, ["verify", str(path)])
    assert res.exit_code == 1, res.output
    assert any(l.startswith("PROBLEM") and "p4" in l and "missing" in l for l in res.stdout.splitlines()), res.stdout


# ------------------------------------------------------------------------------------ data problems
def _copy_dataset(src_toml: Path, dst: Path) -> Path:
    shutil.copytree(src_toml.parent, dst)
    return dst / src_toml.name


def test_image_without_annotations(tmp_path, tiny_model_toml, small_shapes, small_teacher_ckpt):
    data_toml = _copy_dataset(small_shapes, tmp_path / "data")
    ann = data_toml.parent / "annotations" / "train.json"
    coco = json.loads(ann.read_text())
    coco["images"] = coco["images"][:3]
    empty_id = coco["images"][1]["id"]
    coco["annotations"] = [a for a in coco["annotations"]
                           if a["image_id"] in {im["id"] for im in coco["images"]} and a["image_id"] != empty_id]
    ann.write_text(json.dumps(coco))
    data = load_dataset(data_toml, "train")
    assert len(data.records[1].boxes) == 0 and len(data.records[0].boxes) > 0

    out = tmp_path / "c.zarr"
    summary = extract(_opts(tiny_model_toml, small_teacher_ckpt, data_toml, out, items_per_shard=2))
    assert summary["complete"]
    cache = TeacherCache(str(out))
    assert cache.verify().ok
    for v in (0, 1):
        it = cache.read(cache.layout.item_index(1, v))  # image 1 has no boxes
        assert it.gt_boxes.shape == (0, 4) and it.gt_logits.shape == (0, 9)
        assert len(it.proposals) > 0 and it.proposal_logits.shape == (len(it.proposals), 9)
    assert cache.read(0).gt_logits.shape[0] == len(data.records[0].boxes)


def test_nan_teacher_output_stops_naming_the_image(tmp_path, monkeypatch, tiny_model_toml, small_shapes,
                                                   small_teacher_ckpt):
    ds, data = _views_dataset(tiny_model_toml, small_shapes)
    bad_image = 4  # view 0 = item 8, in shard 2 (items 6..8)
    bad_boxes = ds.sample(bad_image, 0)["boxes"]
    assert len(bad_boxes)
    real = extract_mod.teacher_outputs

    def poisoned(teacher, images, boxes, *a, **kw):
        outs = real(teacher, images, boxes, *a, **kw)
        for o, b in zip(outs, boxes):
            if b.shape == bad_boxes.shape and torch.equal(b, bad_boxes):
                o.features[1][0, 0, 0] = float("nan")
        return outs

    monkeypatch.setattr(extract_mod, "teacher_outputs", poisoned)
    out = tmp_path / "c.zarr"
    with pytest.raises(DataError) as e:
        extract(_opts(tiny_model_toml, small_teacher_ckpt, small_shapes, out))
    rec = data.records[bad_image]
    assert f"image id {rec.image_id}" in str(e.value) and rec.file.name in str(e.value)
    cache = TeacherCache(str(out), allow_incomplete=True)
    done = np.asarray(zarr.open_group(str(out), mode="r")["shard_done"][:])
    assert not done[2] and not cache.manifest["complete"]
    for i in (6, 7, 8):  # nothing of the poisoned item's shard was written
        with pytest.raises(IncompleteCacheError):
            cache.read(i)
    assert done[:2].all()  # earlier shards were finished and kept


def test_fp16_overflow_is_refused(tmp_path, monkeypatch, tiny_model_toml, small_shapes, small_teacher_ckpt):
    """A finite teacher value that fp16 cannot hold (> 65504) would be stored as inf: refused."""
    real = extract_mod.teacher_outputs

    def huge(teacher, images, boxes, *a, **kw):
        outs = real(teacher, images, boxes, *a, **kw)
        outs[0].features[0][0, 0, 0] = 1e6
        return outs

    monkeypatch.setattr(extract_mod, "teacher_outputs", huge)
    out = tmp_path / "c.zarr"
    with pytest.raises(DataError, match="fp16"):
        extract(_opts(tiny_model_toml, small_teacher_ckpt, small_shapes, out, codec="fp16"))
    done = np.asarray(zarr.open_group(str(out), mode="r")["shard_done"][:])
    assert not done[0]


def test_unreadable_image_stops_naming_the_file(tmp_path, tiny_model_toml, small_shapes, small_teacher_ckpt):
    data_toml = _copy_dataset(small_shapes, tmp_path / "data")
    data = load_dataset(data_toml, "train")
    victim = data.records[5].file
    victim.write_bytes(b"this is not a png" * 10)
    with pytest.raises(DataError, match=victim.name):
        extract(_opts(tiny_model_toml, small_teacher_ckpt, data_toml, tmp_path / "c.zarr"))


# ------------------------------------------------------------------------------------ RetinaNet
def test_retinanet_extraction(tmp_path, tiny_retina_toml, tiny_retina_checkpoint, tiny_shapes):
    out = tmp_path / "r.zarr"
    summary = extract(_opts(tiny_retina_toml, tiny_retina_checkpoint, tiny_shapes, out, items_per_shard=8,
                            batch_size=4))
    assert summary["complete"]
    cache = TeacherCache(str(out))
    assert [l.name for l in cache.layout.feature_levels] == ["p3", "p4", "p5", "p6", "p7"]
    assert cache.verify().ok
    ds, data = _views_dataset(tiny_retina_toml, tiny_shapes)
    teacher = _teacher(tiny_retina_toml, tiny_retina_checkpoint, data.num_classes)
    for i in (0, 3):
        s = ds.sample(i // 2, i % 2)
        it = cache.read(i)
        image_list, _ = teacher.transform([s["image"]])
        with torch.no_grad():
            fpn, _ = backbone_features(teacher, image_list)
        assert len(it.features) == 5
        for a, b, stride in zip(it.features, fpn.values(), [8, 16, 32, 64, 128]):
            assert a.shape[1:] == tuple(math.ceil(c / stride) for c in s["geometry"].canvas_size)
            torch.testing.assert_close(a, b[0], atol=1e-4, rtol=1e-4)
        assert len(it.proposals) == 0 and it.proposal_logits.numel() == 0 and it.gt_logits.numel() == 0
