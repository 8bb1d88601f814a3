"""Stage 2: DeFeat distillation from a teacher cache (defeat_cache.distill, engine.train in cache mode).

The central check is invariant 1 (faithfulness): one training step computed from the cache equals
the same step with the teacher run online, loss term by loss term and gradient by gradient. All
caches come from conftest's ``tiny_cache`` (extracted with batch_size=1, so cached values are
bit-identical to the single-image teacher forward the online source runs).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import DataLoader

from defeat_cache.cache import extract as extract_mod
from defeat_cache.cache.extract import extract
from defeat_cache.cli import main as cli
from defeat_cache.data.dataset import collate, load_dataset
from defeat_cache.data.records import DataError
from defeat_cache.distill import distiller as distiller_mod
from defeat_cache.distill import sources as sources_mod
from defeat_cache.distill.presets import list_presets, load_preset
from defeat_cache.distill.sources import CachedViewDataset
from defeat_cache.engine import train as train_mod
from defeat_cache.engine.step_check import build_step, losses_and_grads
from defeat_cache.engine.train import TrainStep, train
from defeat_cache.errors import UserError
from defeat_cache.models import zoo
from defeat_cache.models.zoo import load_model_spec

from builders import TINY_RETINA, shapes_dataset, tiny_extract_options, tiny_train_options, write_model_toml
from checks import run_metrics

CPU = torch.device("cpu")
NECK_TERMS = ("loss_neck_obj", "loss_neck_bg", "loss_neck")
DET_TERMS = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
FEATURE_KD_TERMS = {"pkd": {"loss_pkd"}, "cwd": {"loss_cwd"}, "fgd": {"loss_fgd_focal", "loss_fgd_global"},
                    "mgd": {"loss_mgd"}}
KD_TERMS = {"loss_neck_obj", "loss_neck_bg", "loss_neck", "loss_cls_pos", "loss_cls_neg", "loss_cls_kd",
            "loss_backbone"}.union(*FEATURE_KD_TERMS.values())


# ------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def data(tiny_shapes):
    return load_dataset(tiny_shapes, "train")


@pytest.fixture(scope="module")
def student_spec(tiny_student_toml):
    return load_model_spec(str(tiny_student_toml))


def _preset(name: str, tiny_cache, *overrides):
    return load_preset(name, [f"teacher.proposals={tiny_cache.proposals}",
                              f"teacher.pre_nms_top_n={tiny_cache.pre_nms_top_n}", *overrides])


def _make_step(student_spec, data, preset, **source_args):
    """(TrainStep, teacher source): student, source and distiller built exactly as train() builds
    them for run seed 0. `source_args`: cache=... or teacher=..., teacher_checkpoint=..."""
    return build_step(student_spec, data, preset, CPU, **source_args)


def _pick_batches(ds) -> list[list[tuple[int, int]]]:
    """Two batches of 2 (image, view) pairs, each mixing an hflip view and an orig view of images
    with different canvas sizes (so the student batch is padded and the valid masks matter)."""
    n = len(ds.data.records)
    canvas = [ds.sample(i, 0)["geometry"].canvas_size for i in range(n)]
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j and canvas[i] != canvas[j]]
    assert len(pairs) >= 2, "tiny_shapes needs images of two canvas sizes"
    (a, b), (c, d) = pairs[0], next(p for p in pairs[1:] if set(p).isdisjoint(pairs[0]))
    return [[(a, 1), (b, 0)], [(c, 0), (d, 1)]]


def _run(step: TrainStep, source, samples: list[dict], seed: int):
    return losses_and_grads(step, source, samples, CPU, seed=seed)


def _expected_kd_terms(preset: dict) -> set[str]:
    out = set()
    neck, cls, bb = preset["neck"], preset["cls"], preset["backbone"]
    if neck["enabled"] and (neck["alpha_obj"] > 0 or neck["alpha_bg"] > 0):
        out |= {"loss_neck"} if neck["mask"] == "all" else {"loss_neck_obj", "loss_neck_bg"}
    if cls["enabled"]:
        out |= {"loss_cls_kd"} if cls["mode"].startswith("all") else {"loss_cls_pos", "loss_cls_neg"}
    if bb["enabled"]:
        out |= {"loss_backbone"}
    for method, terms in FEATURE_KD_TERMS.items():
        if preset[method]["enabled"]:
            out |= terms
    return out


# ------------------------------------------------------------------------------------ faithfulness
@pytest.fixture(scope="module")
def online_reference(tiny_cache, student_spec, data, tiny_model_toml, tiny_teacher_checkpoint):
    """Factory preset -> the online-mode step (teacher in memory) on two fixed batches: its initial
    state, and per batch the samples, losses and gradients (computed once per preset).
    `name` is a preset name, optionally with `+`-separated --set overrides."""
    made = {}

    def get(name: str):
        if name not in made:
            preset = _preset(*name.split("+")[:1], tiny_cache, *name.split("+")[1:])
            step, source = _make_step(student_spec, data, preset, teacher=str(tiny_model_toml),
                                      teacher_checkpoint=str(tiny_teacher_checkpoint))
            assert isinstance(source, sources_mod.OnlineSource)
            ds = source.dataset(data)
            batches = _pick_batches(ds)
            state = {k: v.clone() for k, v in step.state_dict().items()}
            results = []
            for k, keys in enumerate(batches):
                samples = [ds[key] for key in keys]
                results.append((samples, *_run(step, source, samples, seed=k)))
            made[name] = (preset, batches, state, results)
        return made[name]

    return get


# Tolerances of the lossy codecs (rounding only touches the cached FEATURES; proposals, objectness and
# logits are float32 in every codec): neck terms relative error, gradients relative to each tensor's
# largest gradient. Measured on this tiny setup (random-init teacher): fp16 ~8e-5 / 3e-4, int8 ~1e-4 / 2e-3.
CODEC_TOL = {"fp32": (1e-5, 1e-6), "fp16": (1e-3, 1e-2), "int8": (1e-2, 5e-2)}


def _compare(step, source, ds, reference, codec: str, label: str) -> dict:
    preset, batches, state, results = reference
    neck_tol, grad_tol = CODEC_TOL[codec]
    feature_terms = NECK_TERMS + ("loss_backbone",) + tuple(sorted(KD_TERMS - {"loss_cls_pos", "loss_cls_neg", "loss_cls_kd"}))
    report = {}
    for k, (keys, (online_samples, ref_losses, ref_grads)) in enumerate(zip(batches, results)):
        samples = [ds[key] for key in keys]
        for s, o in zip(samples, online_samples):  # the same student input in both modes
            assert torch.equal(s["image"], o["image"]) and torch.equal(s["boxes"], o["boxes"])
        losses, grads = _run(step, source, samples, seed=k)
        assert set(losses) == set(ref_losses) == DET_TERMS | _expected_kd_terms(preset)
        for name, ref in ref_losses.items():
            rel = abs(losses[name] - ref) / max(abs(ref), 1e-12)
            report[name] = max(report.get(name, 0.0), rel)
            tol = neck_tol if name in feature_terms else 1e-5
            assert rel <= tol, f"{label} batch {k}: {name} cache {losses[name]!r} vs online {ref!r} (rel {rel:.3g})"
        assert set(grads) == set(ref_grads)
        if preset["neck"]["enabled"]:
            assert any(n.startswith("distiller.neck_adapters") for n in grads)
        if preset["backbone"]["enabled"]:
            assert any(n.startswith("distiller.backbone_adapters") for n in grads)
        for method, module in (("fgd", "distiller.fgd_relation_t"), ("mgd", "distiller.mgd_generators")):
            if preset[method]["enabled"]:  # its learned modules train
                assert any(n.startswith(module) for n in grads), method
        worst = 0.0
        for name, g in ref_grads.items():
            scale = float(g.abs().max())
            err = float((grads[name] - g).abs().max())
            worst = max(worst, err / scale if scale > 0 else err)
            assert err <= grad_tol * max(scale, 1e-12), f"{label} batch {k}: grad {name} err {err:.3g} (scale {scale:.3g})"
        report["grad_rel_max"] = max(report.get("grad_rel_max", 0.0), worst)
    print(f"\n[faithfulness {label}] max relative deviation from online: "
          + ", ".join(f"{k}={v:.3g}" for k, v in sorted(report.items())))
    return report


@pytest.mark.parametrize("codec", ["fp32", "fp16", "int8"])
def test_cache_step_equals_online_step(codec, tiny_cache, online_reference, student_spec, data):
    reference = online_reference("defeat")
    preset, batches, state, _ = reference
    step, source = _make_step(student_spec, data, preset, cache=tiny_cache(codec))
    assert isinstance(source, sources_mod.CacheSource)
    step.load_state_dict(state)  # identical student AND adapter weights
    ds = source.dataset(data)
    assert isinstance(ds, CachedViewDataset)
    for keys in batches:
        samples = [ds[key] for key in keys]
        assert any(s["geometry"].flip for s in samples)
        assert len({s["geometry"].canvas_size for s in samples}) == 2
    report = _compare(step, source, ds, reference, codec, f"defeat/{codec}")
    assert {"loss_neck_obj", "loss_neck_bg", "loss_cls_pos", "loss_cls_neg"} <= set(report)
    if codec == "fp32":
        assert all(v <= 1e-6 for v in report.values()), report


# the four other feature-KD methods at once, with DeFeat's cls KD: one reference instead of four
ALL_FEATURE_KD = "pkd_cls_decoupled+cwd.enabled=true+fgd.enabled=true+mgd.enabled=true"


@pytest.mark.parametrize("name", ["defeat_backbone", "mask_random", "mask_fgfi", "cls_subneg", "neck_decoupled_cls_all",
                                  ALL_FEATURE_KD])
def test_cache_step_equals_online_step_other_presets(name, tiny_cache, online_reference, student_spec, data):
    """fp32 cache, presets whose terms use other cached arrays (backbone stages) or the RNG
    (random mask, negative subsampling, MGD's masks) or the student's anchors (FG-Mask), and the
    other feature-KD methods (docs/method.md#other-feature-kd-methods)."""
    reference = online_reference(name)
    preset, _, state, _ = reference
    step, source = _make_step(student_spec, data, preset,
                              cache=tiny_cache("fp32", backbone=bool(preset["backbone"]["enabled"])))
    step.load_state_dict(state)
    report = _compare(step, source, source.dataset(data), reference, "fp32", name)
    assert all(v <= 1e-6 for v in report.values()), report


def test_student_proposals_cache_step_equals_online_step(tiny_cache, online_reference, student_spec, data,
                                                         tiny_teacher_checkpoint, monkeypatch):
    """cls.rois = "student" (docs/method.md#kd-on-the-students-proposals): the head-only teacher on the
    cached features gives the same step as the online teacher's own box head on its features, and
    the KD RoIs it scores are the student's proposals + GT, not the teacher's cached proposals."""
    reference = online_reference("cls_student_rois")
    preset, _, state, _ = reference
    step, source = _make_step(student_spec, data, preset, cache=tiny_cache("fp32"),
                              teacher_head=str(tiny_teacher_checkpoint))
    head = source.roi_head
    assert head is not None and step.distiller.teacher_head is head
    assert not isinstance(head, torch.nn.Module) and not any("teacher" in k for k in step.state_dict())
    assert not any(p.requires_grad for p in head.model.parameters())
    # the box head alone in memory: no backbone, FPN or RPN weights
    assert {n.split(".")[1] for n, _ in head.model.named_parameters()} == {"box_head", "box_predictor"}
    step.load_state_dict(state)
    scored, proposals = [], []
    real_head, real_forward = head.__call__, distiller_mod.Distiller.cls_losses

    def spy_head(features, rois, sizes):
        scored.append([r.clone() for r in rois])
        return real_head(features, rois, sizes)

    def spy_cls(self, student, out, teacher, boxes, device, seeds=None):
        proposals.append(([p.clone() for p in out.proposals], [b.clone() for b in boxes],
                          [t.proposals.clone() for t in teacher]))
        return real_forward(self, student, out, teacher, boxes, device, seeds)

    monkeypatch.setattr(head, "__call__", spy_head, raising=False)
    monkeypatch.setattr(type(head), "__call__", lambda self, *a: spy_head(*a))
    monkeypatch.setattr(distiller_mod.Distiller, "cls_losses", spy_cls)
    report = _compare(step, source, source.dataset(data), reference, "fp32", "cls_student_rois")
    assert all(v <= 1e-6 for v in report.values()), report
    assert len(scored) == len(proposals) == 2
    for rois, (student_props, gts, teacher_props) in zip(scored, proposals):
        for r, p, g, tp in zip(rois, student_props, gts, teacher_props):
            assert len(r) > 0
            cand = torch.cat([p, g])
            assert all(bool((cand == row).all(dim=1).any()) for row in r)  # every scored RoI is a student candidate
            assert not all(bool((tp == row).all(dim=1).any()) for row in r)  # not the teacher's proposals


def test_head_only_teacher_equals_the_full_teacher(tiny_cache, tiny_model_toml, tiny_teacher_checkpoint, data):
    """TeacherRoIHead.from_checkpoint on the cached features = the full teacher's box head on its own
    forward, at arbitrary boxes, for images of different sizes."""
    from defeat_cache.cache import TeacherCache
    from defeat_cache.distill.head_teacher import TeacherRoIHead
    from defeat_cache.models.checkpoint import load_weights
    from defeat_cache.models.forward import backbone_features, roi_class_logits
    spec = load_model_spec(str(tiny_model_toml))
    head = TeacherRoIHead.from_checkpoint(spec, str(tiny_teacher_checkpoint), data, CPU)
    assert all(p.device.type == "cpu" for p in head.model.parameters())
    full = zoo.build_detector(spec, data.num_classes)
    load_weights(full, tiny_teacher_checkpoint, classes=data)
    full.eval()
    cache = TeacherCache(tiny_cache("fp32"))
    gen = torch.Generator().manual_seed(0)
    sizes = set()
    for index in range(min(len(cache), 6)):
        item = cache.read(index)
        h, w = item.image_size
        sizes.add((h, w))
        xy = torch.rand(7, 2, generator=gen) * torch.tensor([w * 0.7, h * 0.7])
        wh = torch.rand(7, 2, generator=gen) * torch.tensor([w * 0.3, h * 0.3]) + 2
        boxes = torch.cat([xy, xy + wh], dim=1)
        got = head([item.features], [boxes], [item.image_size])[0]
        ds_sample = sources_mod.CachedViewDataset(data, sources_mod.Preprocessing.from_dict(
            cache.provenance()["preprocessing"]), sources_mod.ViewSet(tuple(cache.provenance()["views"])),
            cache).sample(item.image_index, item.view_index)
        with torch.no_grad():
            image_list, _ = full.transform([ds_sample["image"]])
            fpn, _ = backbone_features(full, image_list)
            want = roi_class_logits(full, fpn, [boxes], image_list.image_sizes)
        assert got.shape == want.shape == (7, data.num_classes)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(sizes) > 1


def test_student_rois_refuses_what_cannot_work(tiny_cache, student_spec, data, tiny_teacher_checkpoint,
                                              tiny_retina_checkpoint, tiny_retina_toml, tiny_model_toml, tmp_path,
                                              tiny_student_toml, tiny_shapes):
    """The one-line errors of cls.rois = "student", and the CLI path that works (train --teacher-head)."""
    cache, build = tiny_cache("fp32"), sources_mod.build_teacher_source
    student_rois, teacher_rois = _preset("cls_student_rois", tiny_cache), _preset("cls_decoupled", tiny_cache)
    assert student_rois["cls"]["rois"] == "student" and teacher_rois["cls"]["rois"] == "teacher"
    with pytest.raises(UserError, match=r"cls_student_rois: cls.rois = \"student\" needs .* --teacher-head CKPT"):
        build(data, student_spec, student_rois, CPU, cache=cache)
    with pytest.raises(UserError, match="cls_decoupled samples its cls KD RoIs from the teacher's cached proposals"):
        build(data, student_spec, teacher_rois, CPU, cache=cache, teacher_head=str(tiny_teacher_checkpoint))
    with pytest.raises(UserError, match=r"has no roi_heads.box_head.\* / roi_heads.box_predictor.\* weights"):
        build(data, student_spec, student_rois, CPU, cache=cache, teacher_head=str(tiny_retina_checkpoint))
    with pytest.raises(UserError, match="is a RetinaNet model and has no RoI head"):
        build(data, student_spec, student_rois, CPU, cache=cache, teacher_head=str(tiny_retina_checkpoint),
              teacher_head_model=str(tiny_retina_toml))
    with pytest.raises(UserError, match="--teacher-head is for --cache"):
        build(data, student_spec, student_rois, CPU, teacher=str(tiny_model_toml),
              teacher_checkpoint=str(tiny_teacher_checkpoint), teacher_head=str(tiny_teacher_checkpoint))
    with pytest.raises(DataError, match="cls.rois = 'proposals'; choose one of teacher, student"):
        load_preset("cls_decoupled", ["cls.rois=proposals"])
    assert load_preset("defeat", ["cls.rois=student"])["cls"]["rois"] == "student"
    result = CliRunner().invoke(cli, ["train", "--student", "x", "--data", "d.toml", "--out", str(tmp_path / "r"),
                                      "--teacher-head", str(tiny_teacher_checkpoint)])
    assert result.exit_code == 2 and "--teacher-head/--teacher-head-model apply to --cache" in result.output
    args = ["train", "--student", str(tiny_student_toml), "--data", str(tiny_shapes), "--cache", cache,
            "--distill", "cls_student_rois", "--max-iters", "1", "--batch-size", "2", "--workers", "0"]
    result = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "no_head")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith('Error: preset cls_student_rois: cls.rois = "student" needs')
    result = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "run"), "--teacher-head", str(tiny_teacher_checkpoint)])
    assert result.exit_code == 0, result.output
    log_text = (tmp_path / "run" / "train.log").read_text()
    assert "cls on the student's proposals, scored by tiny" in log_text and "(box head only)" in log_text


def test_faithful_on_images_without_boxes(tmp_path, tiny_shapes, tiny_model_toml, tiny_teacher_checkpoint,
                                          student_spec):
    """Batches whose images have no GT (G = 0 cached gt logits; no positive RoIs; all-background masks)."""
    src = Path(tiny_shapes).parent
    dst = tmp_path / "data"
    dst.mkdir()
    (dst / "images").symlink_to(src / "images")
    (dst / "annotations").mkdir()
    coco = json.loads((src / "annotations" / "train.json").read_text())
    coco["images"] = coco["images"][:4]
    keep = {coco["images"][0]["id"], coco["images"][3]["id"]}  # images 1 and 2 lose their boxes
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    (dst / "annotations" / "train.json").write_text(json.dumps(coco))
    (dst / "data.toml").write_text((src / "data.toml").read_text())
    data_toml = dst / "data.toml"
    small = load_dataset(data_toml, "train")
    assert [len(r.boxes) == 0 for r in small.records] == [False, True, True, False]

    cache = tmp_path / "c.zarr"
    extract(tiny_extract_options(tiny_model_toml, tiny_teacher_checkpoint, data_toml, cache, items_per_shard=3))
    preset = load_preset("defeat", ["teacher.proposals=20", "teacher.pre_nms_top_n=50"])
    online, online_source = _make_step(student_spec, small, preset, teacher=str(tiny_model_toml),
                                       teacher_checkpoint=str(tiny_teacher_checkpoint))
    cached, cache_source = _make_step(student_spec, small, preset, cache=str(cache))
    cached.load_state_dict(online.state_dict())
    ds_on = online_source.dataset(small)
    ds_c = cache_source.dataset(small)
    for k, keys in enumerate([[(1, 0), (2, 1)], [(0, 1), (2, 0)]]):
        l_on, g_on = _run(online, online_source, [ds_on[key] for key in keys], seed=k)
        l_c, g_c = _run(cached, cache_source, [ds_c[key] for key in keys], seed=k)
        assert [ds_c[key]["teacher"].gt_logits.shape[0] for key in keys] == [len(small.records[i].boxes)
                                                                            for i, _ in keys]
        if k == 0:  # no GT in the whole batch: no positive RoIs, no object cells
            assert l_c["loss_cls_pos"] == 0 and l_c["loss_neck_obj"] == 0
            assert l_c["loss_cls_neg"] > 0 and l_c["loss_neck_bg"] > 0
        assert set(l_on) == set(l_c)
        for name in l_on:
            assert math.isfinite(l_c[name])
            assert l_c[name] == pytest.approx(l_on[name], rel=1e-5, abs=1e-9), name
        for name, g in g_on.items():
            assert float((g_c[name] - g).abs().max()) <= 1e-6 * max(float(g.abs().max()), 1e-12), name


# ------------------------------------------------------------------------------------ no teacher in cache mode
def test_cache_mode_training_builds_no_teacher(tmp_path, monkeypatch, tiny_cache, tiny_student_toml, tiny_shapes):
    cache = tiny_cache("fp32")  # extracted before counting starts (extraction builds its teacher)
    built = []
    real = zoo.build_detector

    def counting(spec, num_classes):
        built.append(spec if isinstance(spec, str) else spec.name)
        return real(spec, num_classes)

    for mod in (zoo, train_mod, sources_mod, extract_mod):
        monkeypatch.setattr(mod, "build_detector", counting)

    def no_online(*a, **kw):
        raise AssertionError("OnlineSource constructed in cache mode")

    def no_teacher_forward(*a, **kw):
        raise AssertionError("teacher forward in cache mode")

    monkeypatch.setattr(sources_mod.OnlineSource, "__init__", no_online)
    monkeypatch.setattr(sources_mod, "teacher_outputs", no_teacher_forward)
    summary = train(tiny_train_options(tiny_student_toml, tiny_shapes, tmp_path / "run",
                                       distill=_preset("defeat", tiny_cache), cache=cache))
    assert summary["iterations"] == 2
    assert built == ["tiny_student"]


def test_online_mode_training_builds_the_teacher(tmp_path, monkeypatch, tiny_cache, tiny_student_toml, tiny_shapes,
                                                tiny_model_toml, tiny_teacher_checkpoint):
    """The counterpart of the test above (and a check that the counting sees teachers at all)."""
    built = []
    real = zoo.build_detector

    def counting(spec, num_classes):
        built.append(spec if isinstance(spec, str) else spec.name)
        return real(spec, num_classes)

    for mod in (zoo, train_mod, sources_mod):
        monkeypatch.setattr(mod, "build_detector", counting)
    train(tiny_train_options(tiny_student_toml, tiny_shapes, tmp_path / "run", max_iters=1,
                             distill=_preset("defeat", tiny_cache), teacher=str(tiny_model_toml),
                             teacher_checkpoint=str(tiny_teacher_checkpoint)))
    assert sorted(built) == ["tiny_frcnn", "tiny_student"]


# ------------------------------------------------------------------------------------ mismatching caches
def test_cache_of_other_dataset_is_refused(tmp_path, tiny_cache, tiny_student_toml):
    other = shapes_dataset(tmp_path / "other", num_train=12, num_val=2, seed=1)
    with pytest.raises(UserError) as e:
        train(tiny_train_options(tiny_student_toml, other, tmp_path / "run", distill=_preset("defeat", tiny_cache),
                                 cache=tiny_cache("fp32")))
    msg = str(e.value)
    assert "dataset" in msg and "fingerprint" in msg and tiny_cache("fp32") in msg


def test_cache_of_other_preprocessing_is_refused(tmp_path, tiny_cache, tiny_shapes):
    student = write_model_toml(tmp_path / "student80.toml", backbone={"width_divisor": 8, "fpn_channels": 16},
                               input={"min_size": 80, "max_size": 96})
    with pytest.raises(UserError) as e:
        train(tiny_train_options(student, tiny_shapes, tmp_path / "run", distill=_preset("defeat", tiny_cache),
                                 cache=tiny_cache("fp32")))
    msg = str(e.value)
    assert "preprocessing" in msg and "min_size" in msg and "64" in msg and "80" in msg


def test_backbone_preset_needs_backbone_cache(tiny_cache, student_spec, data):
    from defeat_cache.distill.compat import IncompatibleError
    with pytest.raises(IncompatibleError, match="--backbone"):
        _make_step(student_spec, data, _preset("defeat_backbone", tiny_cache), cache=tiny_cache("fp32"))


# ------------------------------------------------------------------------------------ every preset trains
EXPECTED = {  # docs/method.md#logged-loss-terms: the loss names each paper preset must log
    "defeat": {"loss_neck_obj", "loss_neck_bg", "loss_cls_pos", "loss_cls_neg"},
    "neck_all": {"loss_neck"},
    "cls_all": {"loss_cls_kd"},
    "neck_decoupled_cls_all": {"loss_neck_obj", "loss_neck_bg", "loss_cls_kd"},
    "defeat_backbone": {"loss_neck_obj", "loss_neck_bg", "loss_cls_pos", "loss_cls_neg", "loss_backbone"},
    "pkd": {"loss_pkd"}, "cwd": {"loss_cwd"}, "fgd": {"loss_fgd_focal", "loss_fgd_global"}, "mgd": {"loss_mgd"},
    "pkd_cls_decoupled": {"loss_pkd", "loss_cls_pos", "loss_cls_neg"},
    "cls_all_subneg": {"loss_cls_kd"}, "mask_gaussian_obj": {"loss_neck_obj", "loss_neck_bg"},
}


# Presets that differ from another preset in their weights only (other family / CPU-scale values):
# they train through the same code, so one training run of the base stands for them.
WEIGHT_VARIANTS = {"pkd_retina": "pkd", "pkd_cpu": "pkd", "cwd_cpu": "cwd", "fgd_retina": "fgd",
                   "mgd_retina": "mgd", "mgd_cpu": "mgd"}


def test_weight_variants_differ_in_weights_only():
    for variant, base in WEIGHT_VARIANTS.items():
        a, b = load_preset(variant), load_preset(base)
        assert a.keys() == b.keys()
        differ = {(sec, k) for sec in a if isinstance(a[sec], dict) for k in a[sec] if a[sec][k] != b[sec][k]}
        assert differ and all(isinstance(a[sec][k], float) or k == "levels" for sec, k in differ), (variant, differ)


@pytest.mark.parametrize("name", [p for p in list_presets() if p not in WEIGHT_VARIANTS])
def test_train_from_cache_with_preset(name, tmp_path, tiny_cache, tiny_student_toml, tiny_shapes,
                                      tiny_teacher_checkpoint):
    preset = _preset(name, tiny_cache)
    expected = _expected_kd_terms(preset)
    if name in EXPECTED:
        assert expected == EXPECTED[name]
    cache = tiny_cache("fp32", backbone=bool(preset["backbone"]["enabled"]))
    run = tmp_path / "run"
    # cls.rois = "student" (cls_student_rois): the teacher's box head scores the student's proposals
    head = {"teacher_head": str(tiny_teacher_checkpoint)} if preset["cls"]["rois"] == "student" else {}
    summary = train(tiny_train_options(tiny_student_toml, tiny_shapes, run, distill=preset, cache=cache, **head))
    assert summary["iterations"] == 2 and Path(summary["final"]).is_file()
    lines = run_metrics(run)
    assert [l["iter"] for l in lines] == [1, 2]
    for line in lines:
        kd = {k for k in line if k.startswith("loss_")} - DET_TERMS
        assert kd == expected, f"{name}: logged {sorted(kd)}, expected {sorted(expected)}"
        assert DET_TERMS <= set(line)
        assert all(math.isfinite(line[k]) for k in kd | {"loss"})
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["options"]["cache"] == cache and cfg["options"]["distill"]["name"] == name


# ------------------------------------------------------------------------------------ --set overrides
def test_preset_overrides():
    assert load_preset("defeat")["neck"]["alpha_bg"] == 16.0
    p = load_preset("defeat", ["neck.alpha_bg=8", "cls.mode=\"all\"", "backbone.stages=[\"c4\"]"])
    assert p["neck"]["alpha_bg"] == 8 and p["cls"]["mode"] == "all" and p["backbone"]["stages"] == ["c4"]
    assert p["overrides"] == ["neck.alpha_bg=8", "cls.mode=\"all\"", "backbone.stages=[\"c4\"]"]
    assert load_preset("defeat")["neck"]["alpha_bg"] == 16.0  # the file is not changed
    with pytest.raises(DataError, match="alpha_typo"):
        load_preset("defeat", ["neck.alpha_typo=8"])
    with pytest.raises(DataError, match="nosection"):
        load_preset("defeat", ["nosection.alpha_bg=8"])
    with pytest.raises(DataError, match="SECTION.KEY=VALUE"):
        load_preset("defeat", ["neck.alpha_bg"])
    with pytest.raises(DataError, match="alpha_bg"):
        load_preset("defeat", ["neck.alpha_bg=-1"])
    with pytest.raises(DataError, match="no_such_preset"):
        load_preset("no_such_preset")


def test_cli_train_from_cache_with_override(tmp_path, tiny_cache, tiny_student_toml, tiny_shapes):
    run = tmp_path / "run"
    common = ["train", "--student", str(tiny_student_toml), "--data", str(tiny_shapes), "--out", str(run),
              "--cache", tiny_cache("fp32"), "--distill", "defeat", "--max-iters", "1", "--batch-size", "2",
              "--workers", "0", "--log-every", "1"]
    res = CliRunner().invoke(cli, common + ["--set", "neck.alpha_bg=8"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["iterations"] == 1
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["options"]["distill"]["neck"]["alpha_bg"] == 8
    assert {"loss_neck_obj", "loss_neck_bg", "loss_cls_pos", "loss_cls_neg"} <= set(run_metrics(run)[0])

    bad = CliRunner().invoke(cli, common + ["--set", "neck.nope=1"])
    assert bad.exit_code != 0 and "nope" in bad.output and "Traceback" not in bad.output


def test_same_seed_same_first_steps_in_cache_and_online_modes(tmp_path, tiny_cache, tiny_student_toml, tiny_shapes,
                                                             tiny_model_toml, tiny_teacher_checkpoint):
    """`train --seed 3 --cache C` and `train --seed 3 --teacher T --teacher-checkpoint CK` (the
    teacher C was extracted from, fp32) report the same losses: building the online teacher
    draws nothing from the adapters' (or the student's) generator (defeat_cache.seeding).
    The shapes images are 64..96 px, so a batch holds images of different sizes."""
    def first_steps(mode: list[str], name: str) -> list[dict]:
        run = tmp_path / name
        args = ["train", "--student", str(tiny_student_toml), "--data", str(tiny_shapes), "--out", str(run),
                "--distill", "defeat", "--seed", "3", "--max-iters", "2", "--batch-size", "2", "--workers", "0",
                "--log-every", "1", *mode]
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 0, res.output
        return run_metrics(run)

    cached = first_steps(["--cache", tiny_cache("fp32")], "cache")
    online = first_steps(["--teacher", str(tiny_model_toml), "--teacher-checkpoint", str(tiny_teacher_checkpoint),
                          "--set", f"teacher.proposals={tiny_cache.proposals}",
                          "--set", f"teacher.pre_nms_top_n={tiny_cache.pre_nms_top_n}"], "online")
    terms = [k for k in cached[0] if k.startswith("loss")]
    assert {"loss_neck_obj", "loss_neck_bg", "loss_cls_pos", "loss_cls_neg"} <= set(terms)
    for c, o in zip(cached, online, strict=True):
        for k in terms:  # same-canvas images may share a teacher forward online: float-level only
            assert o[k] == pytest.approx(c[k], rel=1e-5, abs=1e-7), f"iteration {c['iter']}: {k}"


# ------------------------------------------------------------------------------------ RetinaNet
@pytest.fixture(scope="module")
def retina_cache(tmp_path_factory, tiny_retina_toml, tiny_retina_checkpoint, tiny_shapes):
    """A RetinaNet teacher cache (FPN P3-P7 and backbone stages; no proposals or logits)."""
    out = tmp_path_factory.mktemp("retina_cache") / "r.zarr"
    extract(tiny_extract_options(tiny_retina_toml, tiny_retina_checkpoint, tiny_shapes, out, codec="fp16",
                                 backbone=True, batch_size=4, items_per_shard=8))
    return str(out)


@pytest.fixture(scope="module")
def retina_student_toml(tmp_path_factory):
    """A smaller RetinaNet student (eighth-width, 16-ch FPN) with ``tiny_retina_toml``'s preprocessing."""
    return write_model_toml(tmp_path_factory.mktemp("models") / "tiny_retina_student.toml", base=TINY_RETINA,
                            backbone={"width_divisor": 8, "fpn_channels": 16})


def test_retinanet_student_from_retinanet_cache(tmp_path, retina_cache, retina_student_toml, tiny_shapes,
                                                tiny_student_toml):
    from defeat_cache.distill.compat import IncompatibleError
    run = tmp_path / "run"
    summary = train(tiny_train_options(retina_student_toml, tiny_shapes, run, distill=load_preset("defeat"),
                                       cache=retina_cache))
    assert summary["iterations"] == 2
    for line in run_metrics(run):
        assert {"loss_neck_obj", "loss_neck_bg"} <= set(line)
        assert not {k for k in line if k.startswith("loss_cls_")}
        assert all(math.isfinite(line[k]) for k in ("loss_neck_obj", "loss_neck_bg", "loss"))

    # backbone imitation (docs/method.md#retinanet: RetinaNet neck + optional backbone) once cls KD is switched off;
    # only `defeat` drops its RoI part by itself (docs/method.md), so defeat_backbone needs cls.enabled=false
    with pytest.raises(IncompatibleError, match="cls.enabled=false"):
        train(tiny_train_options(retina_student_toml, tiny_shapes, tmp_path / "run_bb_cls", max_iters=1,
                                 distill=load_preset("defeat_backbone"), cache=retina_cache))
    run_bb = tmp_path / "run_bb"
    train(tiny_train_options(retina_student_toml, tiny_shapes, run_bb, max_iters=1,
                             distill=load_preset("defeat_backbone", ["cls.enabled=false"]), cache=retina_cache))
    line = run_metrics(run_bb)[0]
    assert {"loss_neck_obj", "loss_neck_bg", "loss_backbone"} <= set(line) and math.isfinite(line["loss_backbone"])

    # the other feature-KD methods, all at once, on a 16-channel student of a 32-channel teacher (1x1 aligners)
    run_kd = tmp_path / "run_kd"
    train(tiny_train_options(retina_student_toml, tiny_shapes, run_kd, max_iters=1, cache=retina_cache,
                             distill=load_preset("fgd_retina", ["pkd.enabled=true", "cwd.enabled=true",
                                                                "mgd.enabled=true"])))
    line = run_metrics(run_kd)[0]
    kd = {"loss_pkd", "loss_cwd", "loss_fgd_focal", "loss_fgd_global", "loss_mgd"}
    assert kd <= set(line) and all(math.isfinite(line[k]) and line[k] > 0 for k in kd), line
    state = torch.load(run_kd / "last.pt", map_location="cpu", weights_only=True)["train_state"]
    assert tuple(state["distiller.feature_align.convs.0.weight"].shape) == (32, 16, 1, 1)

    with pytest.raises(IncompatibleError, match="RoI"):  # a cls-only preset cannot apply to RetinaNet
        train(tiny_train_options(retina_student_toml, tiny_shapes, tmp_path / "run2",
                                 distill=load_preset("cls_decoupled"), cache=retina_cache))
    with pytest.raises(IncompatibleError, match="family|retinanet"):  # no cross-family distillation
        train(tiny_train_options(tiny_student_toml, tiny_shapes, tmp_path / "run3",
                                 distill=load_preset("neck_decoupled"), cache=retina_cache))


# ------------------------------------------------------------------------------------ concurrent readers
def test_concurrent_readers_read_identical_items(tiny_cache, data, student_spec):
    from defeat_cache.cache import TeacherCache
    from defeat_cache.views import ViewSet

    path = tiny_cache("int8")
    keys = [(i, v) for i in range(len(data.records)) for v in (0, 1)]

    def loader():
        ds = CachedViewDataset(data, student_spec.preprocessing, ViewSet.parse("orig,hflip"), TeacherCache(path))
        return DataLoader(ds, batch_size=3, sampler=keys, collate_fn=collate, num_workers=2)

    reference = TeacherCache(path)
    seen = 0
    for b1, b2 in zip(loader(), loader()):  # both loaders (4 worker processes) read at the same time
        for s1, s2 in zip(b1, b2):
            assert (s1["image_index"], s1["view_index"]) == (s2["image_index"], s2["view_index"])
            t1, t2 = s1["teacher"], s2["teacher"]
            ref = reference.read(s1["image_index"] * 2 + s1["view_index"])
            for a, b, r in zip(t1.features, t2.features, ref.features):
                assert torch.equal(a, b) and torch.equal(a, r)
            for name in ("proposals", "objectness", "proposal_logits", "gt_boxes", "gt_logits"):
                assert torch.equal(getattr(t1, name), getattr(t2, name))
                assert torch.equal(getattr(t1, name), getattr(ref, name))
            seen += 1
    assert seen == len(keys)


def test_seeded_kd_sampling_is_per_image(monkeypatch, tiny_cache, student_spec, data):
    """With per-image seeds (as train() passes them), an image's KD RoIs are the same whether it
    comes second in a batch or alone (what makes DDP equal single-process training), and the
    sub-negative variant keeps, per image, as many negatives as that image's positives."""
    from torchvision.ops import box_iou

    from defeat_cache.models.sampling import item_seed

    step, source = _make_step(student_spec, data, _preset("cls_subneg", tiny_cache), cache=tiny_cache("fp32"))
    ds = source.dataset(data)
    seen, real = [], distiller_mod.roi_class_logits

    def recording(student, fpn, rois, sizes):
        seen.append([r.clone() for r in rois])
        return real(student, fpn, rois, sizes)

    monkeypatch.setattr(distiller_mod, "roi_class_logits", recording)
    a, b = ds[(0, 0)], ds[(1, 1)]
    seed_a, seed_b = item_seed(0, 0, 0, 0), item_seed(0, 0, 1, 1)

    def run(samples, seeds):
        targets = [{"boxes": s["boxes"], "labels": s["labels"]} for s in samples]
        images = [s["image"] for s in samples]
        return step(images, targets, source.outputs(samples, images), seeds)

    run([b, a], [seed_b, seed_a])
    run([a], [seed_a])
    assert torch.equal(seen[0][1], seen[1][0])
    for rois, s in zip(seen[0], [b, a]):
        pos = box_iou(rois, s["boxes"]).max(dim=1).values >= 0.5
        assert 0 < int(pos.sum()) == int((~pos).sum())


@pytest.mark.parametrize("name", ["cls_all_pos", "cls_all_neg", "cls_all_subneg"])
def test_all_cls_kd_over_one_kind_of_roi(name, monkeypatch, tiny_cache, student_spec, data):
    """Table 5's all-cls rows over part of the sampled RoIs: the student's head sees only the
    positives, only the negatives, or the positives and as many negatives (per image), and the
    term is lam x the mean KL over exactly those RoIs."""
    from torchvision.ops import box_iou

    from defeat_cache.distill.losses import kl_div_with_temperature
    from defeat_cache.models.sampling import item_seed

    step, source = _make_step(student_spec, data, _preset(name, tiny_cache), cache=tiny_cache("fp32"))
    ds = source.dataset(data)
    seen, real = [], distiller_mod.roi_class_logits

    def recording(student, fpn, rois, sizes):
        seen.append([r.clone() for r in rois])
        out = real(student, fpn, rois, sizes)
        seen.append(out.detach().clone())
        return out

    monkeypatch.setattr(distiller_mod, "roi_class_logits", recording)
    samples = [ds[(0, 0)], ds[(1, 1)]]
    targets = [{"boxes": s["boxes"], "labels": s["labels"]} for s in samples]
    images = [s["image"] for s in samples]
    teacher = source.outputs(samples, images)
    losses = step(images, targets, teacher, [item_seed(0, 0, 0, 0), item_seed(0, 0, 1, 1)])
    rois, s_logits = seen
    counts = []
    t_logits = []
    for r, s, t in zip(rois, samples, teacher):
        pos = box_iou(r, s["boxes"]).max(dim=1).values >= 0.5
        counts.append((int(pos.sum()), int((~pos).sum())))
        cand = torch.cat([t.proposals, t.gt_boxes])
        index = box_iou(r, cand).max(dim=1).indices  # each kept RoI is one of the cached candidates
        t_logits.append(torch.cat([t.proposal_logits, t.gt_logits])[index])
    if name == "cls_all_pos":
        assert all(p > 0 and n == 0 for p, n in counts), counts
    elif name == "cls_all_neg":
        assert all(p == 0 and n > 0 for p, n in counts), counts
    else:
        assert all(0 < p == n for p, n in counts), counts
    expected = kl_div_with_temperature(s_logits, torch.cat(t_logits), 1.0).mean()
    assert set(losses) - DET_TERMS == {"loss_cls_kd"}
    assert losses["loss_cls_kd"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_unreadable_cache_chunk_is_one_clear_error(tmp_path, tiny_cache, tiny_student_toml, tiny_shapes):
    """A damaged cache read inside DataLoader workers ends training with one `Error:` line naming
    the cache and the item (not a worker traceback)."""
    import random
    import shutil
    path = tmp_path / "damaged.zarr"
    shutil.copytree(tiny_cache("fp32"), path)
    rng = random.Random(0)
    for f in (path / "features" / "p4").rglob("*"):
        if f.is_file() and f.name != "zarr.json":
            f.write_bytes(bytes(rng.randrange(256) for _ in range(f.stat().st_size)))
    res = CliRunner().invoke(cli, ["train", "--student", str(tiny_student_toml), "--data", str(tiny_shapes),
                                   "--out", str(tmp_path / "run"), "--cache", str(path), "--max-iters", "2",
                                   "--batch-size", "2", "--workers", "2"])
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert lines[-1].startswith(f"Error: cache {path}: reading item ") and "failed" in lines[-1]
    assert "Traceback" not in res.output and sum(line.startswith("Error") for line in lines) == 1
