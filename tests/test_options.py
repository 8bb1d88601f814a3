"""Option checking: `--set` values typed by the preset key they replace, and range/choice checks of
the extract and train options, each a one-line error naming the option (library and CLI alike)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from defeat_cache.cache.extract import ExtractOptions
from defeat_cache.cli import main
from defeat_cache.distill.presets import PRESET_DIR, load_preset
from defeat_cache.engine.train import TrainOptions
from defeat_cache.errors import UserError


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------
# --set: parsed by the type of the preset value it replaces
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["False", "false", "FALSE"])
def test_set_bool_becomes_a_bool(text):
    p = load_preset("defeat", [f"neck.enabled={text}", "backbone.enabled=True"])
    assert p["neck"]["enabled"] is False and p["backbone"]["enabled"] is True


def test_set_values_take_the_preset_type():
    p = load_preset("defeat", ["neck.alpha_bg=8", "cls.rois_per_image=128", "cls.mode=all", 'neck.mask="fgfi"',
                               "neck.finest_scale=40", "backbone.stages=[\"c4\", \"c5\"]", "cls.fg_iou=0.6"])
    assert p["neck"]["alpha_bg"] == 8.0 and isinstance(p["neck"]["alpha_bg"], float)
    assert p["cls"]["rois_per_image"] == 128 and isinstance(p["cls"]["rois_per_image"], int)
    assert p["cls"]["mode"] == "all" and p["neck"]["mask"] == "fgfi"
    assert p["neck"]["finest_scale"] == 40  # "auto" or a number
    assert p["backbone"]["stages"] == ["c4", "c5"] and p["cls"]["fg_iou"] == 0.6


@pytest.mark.parametrize("assignment, expected", [
    ("cls.fg_iou=abc", "--set cls.fg_iou=abc: expected a number"),
    ("cls.rois_per_image=abc", "--set cls.rois_per_image=abc: expected an integer"),
    ("cls.rois_per_image=1.5", "cls.rois_per_image must be an integer >= 0, got 1.5"),
    ("pkd.levels=2.5", "pkd.levels is a count of FPN levels (0 = all), got 2.5"),
    ("neck.enabled=maybe", "--set neck.enabled=maybe: expected true or false"),
    ("backbone.stages=c4", "--set backbone.stages=c4: expected a list"),
    ("cls.fg_iou=1.5", "cls.fg_iou must be a number in [0, 1]"),
    ("cls.positive_fraction=-0.1", "cls.positive_fraction must be a number in [0, 1]"),
    ("cls.rois_per_image=-1", "cls.rois_per_image must be an integer >= 0"),
    ("teacher.proposals=0", "teacher.proposals must be an integer >= 1"),
    ("neck.finest_scale=abc", "neck.finest_scale must be \"auto\" or a positive number"),
    ("neck=1", "--set neck=1: neck is a section"),
])
def test_set_bad_values_are_one_line_naming_key_and_type(assignment, expected):
    with pytest.raises(UserError) as e:
        load_preset("defeat", [assignment])
    assert expected in _one_line(e)


def test_set_unknown_key_lists_the_known_keys():
    with pytest.raises(UserError) as e:
        load_preset("defeat", ["cls.fg_iuo=0.6"])
    msg = _one_line(e)
    assert "'fg_iuo'" in msg and "fg_iou" in msg and "rois_per_image" in msg


# ------------------------------------------------------------------------------------------------
# extract / train option records: the same errors for library users and the CLI
# ------------------------------------------------------------------------------------------------

EXTRACT_BAD = [
    ({"views": "orig,vflip"}, "--views 'orig,vflip': unknown view 'vflip'; the views are orig, hflip"),
    ({"views": "orig,orig"}, "--views 'orig,orig': view 'orig' given twice"),
    ({"proposals": 0}, "--proposals 0: must be at least 1"),
    ({"items_per_shard": 0}, "--items-per-shard 0: must be at least 1"),
    ({"batch_size": 0}, "--batch-size 0: must be at least 1"),
    ({"workers": -1}, "--workers -1: must be 0 or more"),
    ({"device": "tpu"}, "--device 'tpu': not a device here; use cpu, cuda or cuda:N"),
]
TRAIN_BAD = [
    ({"views": "orig,vflip"}, "--views 'orig,vflip': unknown view 'vflip'; the views are orig, hflip"),
    ({"batch_size": 0}, "--batch-size 0: must be at least 1"),
    ({"workers": -1}, "--workers -1: must be 0 or more"),
    ({"device": "tpu"}, "--device 'tpu': not a device here; use cpu, cuda or cuda:N"),
    ({"log_every": 0}, "--log-every 0: must be at least 1"),
    ({"epochs": 0.0}, "--epochs 0.0: must be more than 0"),
    ({"lr": -0.1}, "--lr -0.1: must be more than 0"),
]


@pytest.mark.parametrize("bad, expected", EXTRACT_BAD)
def test_extract_options_refuse_bad_values(tmp_path, bad, expected):
    with pytest.raises(UserError) as e:
        ExtractOptions(teacher="r18q_fpn_cpu", checkpoint="t.pt", data="d.toml", out=str(tmp_path / "c"), **bad)
    assert expected in _one_line(e)


@pytest.mark.parametrize("bad, expected", TRAIN_BAD)
def test_train_options_refuse_bad_values(tmp_path, bad, expected):
    with pytest.raises(UserError) as e:
        TrainOptions(student="r18q_fpn_cpu", data="d.toml", out=str(tmp_path / "run"), **bad)
    assert expected in _one_line(e)


def _cli_error(args: list) -> str:
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit)
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, r.output
    return errors[0]


_CLI_FLAG = {"views": "--views", "proposals": "--proposals", "items_per_shard": "--items-per-shard",
             "batch_size": "--batch-size", "workers": "--workers", "device": "--device", "log_every": "--log-every",
             "epochs": "--epochs", "lr": "--lr"}


@pytest.mark.parametrize("bad, expected", EXTRACT_BAD)
def test_cli_extract_bad_options_are_one_line(tmp_path, tiny_shapes, bad, expected):
    ((key, value),) = bad.items()
    out = tmp_path / "cache"
    error = _cli_error(["extract", "--teacher", "r18q_fpn_cpu", "--checkpoint", tmp_path / "t.pt", "--data",
                        tiny_shapes, "--out", out, _CLI_FLAG[key], value])
    assert expected in error
    assert not out.exists()  # refused before anything was created


@pytest.mark.parametrize("bad, expected", [b for b in TRAIN_BAD if "views" not in b[0]])  # no train --views
def test_cli_train_bad_options_are_one_line(tmp_path, tiny_shapes, bad, expected):
    ((key, value),) = bad.items()
    out = tmp_path / "run"
    error = _cli_error(["train", "--student", "r18q_fpn_cpu", "--data", tiny_shapes, "--out", out,
                        _CLI_FLAG[key], value])
    assert expected in error
    assert not out.exists()


@pytest.mark.parametrize("assignment, expected", [
    ("cls.fg_iou=abc", "--set cls.fg_iou=abc: expected a number"),
    ("cls.rois_per_image=abc", "--set cls.rois_per_image=abc: expected an integer"),
])
def test_cli_set_bad_values_are_one_line(tmp_path, tiny_shapes, assignment, expected):
    error = _cli_error(["train", "--student", "r18q_fpn_cpu", "--data", tiny_shapes, "--out", tmp_path / "run",
                        "--cache", tmp_path / "no_cache", "--set", assignment])
    assert expected in error


@pytest.mark.parametrize("bad, expected", [({"views": "vflip"}, "unknown view 'vflip'"),
                                           ({"proposals": 0}, "--proposals 0: must be at least 1"),
                                           ({"sample_images": 0}, "--sample 0: must be at least 1"),
                                           ({"device": "tpu"}, "--device 'tpu': not a device here")])
def test_plan_options_refuse_bad_values(bad, expected):
    from defeat_cache.cache.plan import PlanOptions

    with pytest.raises(UserError) as e:
        PlanOptions(teacher="r18q_fpn_cpu", checkpoint="t.pt", data="d.toml", **bad)
    assert expected in _one_line(e)


def test_cli_set_false_switches_the_part_off(tmp_path, tiny_cache, tiny_student_toml, tiny_shapes):
    """`--set neck.enabled=False` used to be the string 'False' (truthy): neck KD stayed on."""
    import json

    from checks import run_metrics

    run = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "--student", str(tiny_student_toml), "--data", str(tiny_shapes), "--out",
                                  str(run), "--cache", tiny_cache("fp32"), "--max-iters", "1", "--batch-size", "2",
                                  "--workers", "0", "--log-every", "1", "--set", "neck.enabled=False"])
    assert r.exit_code == 0, r.output
    assert json.loads((run / "config.json").read_text())["options"]["distill"]["neck"]["enabled"] is False
    terms = set(run_metrics(run)[0])
    assert {"loss_cls_pos", "loss_cls_neg"} <= terms and not {t for t in terms if t.startswith("loss_neck")}


def test_set_float_into_a_weight_the_preset_wrote_as_an_integer(tmp_path):
    text = (Path(PRESET_DIR / "defeat.toml").read_text()).replace("alpha_bg = 16.0", "alpha_bg = 16")
    (tmp_path / "mine.toml").write_text(text)
    assert load_preset(str(tmp_path / "mine.toml"), ["neck.alpha_bg=8.5"])["neck"]["alpha_bg"] == 8.5
