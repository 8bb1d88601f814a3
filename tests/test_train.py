"""Training loop (metrics, checkpoints, resume, determinism, lr schedule), evaluation and the CLI.

Every run is a few iterations of the tiny Faster R-CNN on the tiny shapes dataset (12 train
images, batch 2 -> 6 iterations per epoch), single process, DataLoader workers 0.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from defeat_cache.cli import main
from defeat_cache.data.dataset import load_dataset
from defeat_cache.engine.evaluate import evaluate
from defeat_cache.engine.metrics import COCO_METRIC_NAMES
from defeat_cache.engine.train import TrainOptions, train
from defeat_cache.errors import UserError
from defeat_cache.models.checkpoint import load_trained, load_weights, read_checkpoint
from defeat_cache.models.zoo import build_detector, load_model_spec

from builders import tiny_train_options
from checks import run_metrics

FRCNN_LOSSES = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")


def _opts(model_toml, data_toml, out, /, **overrides) -> TrainOptions:
    """This file's runs: the tiny ones (batch 2), seed 0, a warm-up of 1 iteration."""
    return tiny_train_options(model_toml, data_toml, out, **{"seed": 0, "warmup_iters": 1, **overrides})


def _weights(checkpoint: Path) -> dict:
    return read_checkpoint(checkpoint)["model_state"]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0 for k in a)


# ------------------------------------------------------------------------------------------------
# runs (module-scoped: each is trained once)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tiny_model_toml, tiny_shapes) -> Path:
    """4 iterations straight through (batch 2, warm-up 1 iteration)."""
    out = tmp_path_factory.mktemp("straight")
    summary = train(_opts(tiny_model_toml, tiny_shapes, out, max_iters=4))
    assert summary["iterations"] == 4
    return out


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, tiny_model_toml, tiny_shapes) -> Path:
    """Like straight_run, but stopped after 2 iterations (mid-epoch) and resumed to 4, twice:
    the second time from the 2-iteration last.pt again, as if the first continuation had been
    killed after logging iterations 3 and 4 but before it rewrote last.pt.

    The 2-iteration final.pt is kept as first_final.pt, its metrics as first_metrics.jsonl.
    """
    out = tmp_path_factory.mktemp("resumed")
    train(_opts(tiny_model_toml, tiny_shapes, out, max_iters=2))
    for name in ("final.pt", "metrics.jsonl", "last.pt"):
        shutil.copy(out / name, out / f"first_{name}")
    train(_opts(tiny_model_toml, tiny_shapes, out, max_iters=4, resume=True))
    shutil.copy(out / "first_last.pt", out / "last.pt")  # killed before its last.pt was written
    train(_opts(tiny_model_toml, tiny_shapes, out, max_iters=4, resume=True))
    return out


# ------------------------------------------------------------------------------------------------
# training outputs
# ------------------------------------------------------------------------------------------------

def test_train_writes_metrics_and_checkpoints(straight_run):
    lines = run_metrics(straight_run)
    assert [m["iter"] for m in lines] == [1, 2, 3, 4]
    for m in lines:
        for key in ("iter", "epoch", "lr", "images_per_s", "loss", "time", *FRCNN_LOSSES):
            assert key in m, key
        assert math.isfinite(m["loss"]) and m["images_per_s"] > 0 and m["epoch"] == 0
        assert m["loss"] == pytest.approx(sum(m[k] for k in FRCNN_LOSSES), rel=1e-5)
    final = read_checkpoint(straight_run / "final.pt")
    assert final["iteration"] == 4 and final["num_classes"] == 9
    assert final["model"]["name"] == "tiny_frcnn"
    assert final["preprocessing"]["min_size"] == 64 and final["preprocessing"]["max_size"] == 96
    last = read_checkpoint(straight_run / "last.pt")
    assert last["iteration"] == 4 and {"optimizer", "scheduler", "train_state", "rng"} <= set(last)
    config = json.loads((straight_run / "config.json").read_text())
    assert config["total_iters"] == 4 and config["global_batch"] == 2
    assert config["lr"] == pytest.approx(0.02 / 16 * 2)  # default lr_per_image x batch
    assert not list(straight_run.glob("*.partial"))


def test_trained_weights_changed(straight_run, tiny_model_toml):
    torch.manual_seed(0)
    init = build_detector(str(tiny_model_toml), 9).state_dict()
    assert _max_diff(init, _weights(straight_run / "final.pt")) > 0


def test_same_seed_gives_identical_weights(tmp_path, tiny_model_toml, tiny_shapes, resumed_run):
    train(_opts(tiny_model_toml, tiny_shapes, tmp_path, max_iters=2))
    assert _max_diff(_weights(tmp_path / "final.pt"), _weights(resumed_run / "first_final.pt")) == 0.0
    assert [m["loss"] for m in run_metrics(tmp_path)] == [m["loss"] for m in
                                                        run_metrics(resumed_run)[:2]]


def test_resume_continues_from_last_checkpoint(resumed_run, tiny_model_toml, tiny_shapes):
    first = (resumed_run / "first_metrics.jsonl").read_text().splitlines()
    lines = run_metrics(resumed_run)
    assert (resumed_run / "metrics.jsonl").read_text().splitlines()[:2] == first  # kept as they were
    # one line per iteration: what the killed continuation logged after last.pt went
    assert [m["iter"] for m in lines] == [1, 2, 3, 4]
    # the training time goes on from the 2-iteration last.pt's, it does not restart
    first_seconds = read_checkpoint(resumed_run / "first_last.pt")["run_state"]["train_seconds"]
    assert lines[1]["time"] <= first_seconds + 0.01 < lines[2]["time"] < lines[3]["time"]
    assert read_checkpoint(resumed_run / "last.pt")["run_state"]["train_seconds"] >= lines[3]["time"] - 0.01
    assert read_checkpoint(resumed_run / "last.pt")["iteration"] == 4
    assert read_checkpoint(resumed_run / "final.pt")["iteration"] == 4
    # resuming a finished run is a no-op
    summary = train(_opts(tiny_model_toml, tiny_shapes, resumed_run, max_iters=4, resume=True))
    assert summary["iterations"] == 4
    assert len(run_metrics(resumed_run)) == 4


def test_tensorboard_events_hold_the_metrics(straight_run, resumed_run):
    """tb/'s scalars, read back with TensorBoard's own reader, are metrics.jsonl's numbers; the
    resumed run's killed continuation (events 3 and 4 logged twice) shows once (purge_step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for run in (straight_run, resumed_run):
        events = EventAccumulator(str(run / "tb"))
        events.Reload()
        lines = run_metrics(run)
        tags = set(events.Tags()["scalars"])
        assert {f"train/{k}" for k in (*FRCNN_LOSSES, "loss", "lr", "images_per_s", "grad_norm")} <= tags
        for key in (*FRCNN_LOSSES, "loss", "lr"):
            scalars = events.Scalars(f"train/{key}")
            assert [e.step for e in scalars] == [1, 2, 3, 4]
            assert [e.value for e in scalars] == pytest.approx([m[key] for m in lines], rel=1e-6)
    assert len(list((resumed_run / "tb").glob("events.out.tfevents.*"))) == 3  # one file per session


def test_train_log_has_the_progress_and_summary(straight_run):
    text = (straight_run / "train.log").read_text()
    assert "shapes/train: 12 images" in text
    assert [line.split(" train iter ")[1].split()[0] for line in text.splitlines() if " train iter " in line] == \
        ["1/4", "2/4", "3/4", "4/4"]
    summary = json.loads(text.split(" summary ")[-1])
    assert summary["iterations"] == 4 and summary["final"] == str(straight_run / "final.pt")
    assert "frozen BatchNorm" not in text  # norm = "bn"


def test_resume_refuses_another_model(resumed_run, tiny_retina_toml, tiny_shapes):
    with pytest.raises(UserError, match="tiny_frcnn"):
        train(_opts(tiny_retina_toml, tiny_shapes, resumed_run, max_iters=6, resume=True))


def test_resume_refuses_another_global_batch(resumed_run, tiny_model_toml, tiny_shapes):
    """Iterations count global batches (e.g. 8 GPUs x 2 resumed on 4 GPUs x 2 would shift the schedule)."""
    batch = _opts(tiny_model_toml, tiny_shapes, resumed_run).batch_size
    with pytest.raises(UserError, match=f"global batch of {batch} images.*1 x {batch + 1} = {batch + 1}"):
        train(_opts(tiny_model_toml, tiny_shapes, resumed_run, max_iters=6, resume=True, batch_size=batch + 1))
    assert read_checkpoint(resumed_run / "last.pt")["iteration"] == 4  # nothing was trained


def test_resume_at_epoch_boundary_matches_straight_run(tmp_path, tiny_model_toml, tiny_shapes):
    """Batch 4: 3 iterations per epoch; stop after epoch 0, resume, compare with a straight run."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(_opts(tiny_model_toml, tiny_shapes, straight, batch_size=4, max_iters=4))
    train(_opts(tiny_model_toml, tiny_shapes, resumed, batch_size=4, max_iters=3))
    train(_opts(tiny_model_toml, tiny_shapes, resumed, batch_size=4, max_iters=4, resume=True))
    assert [m["epoch"] for m in run_metrics(resumed)] == [0, 0, 0, 1]
    assert _max_diff(_weights(straight / "final.pt"), _weights(resumed / "final.pt")) <= 1e-5
    assert [m["loss"] for m in run_metrics(straight)] == pytest.approx([m["loss"] for m in run_metrics(resumed)],
                                                                     abs=1e-6)


def test_resume_mid_epoch_matches_straight_run(straight_run, resumed_run):
    assert _max_diff(_weights(straight_run / "final.pt"), _weights(resumed_run / "final.pt")) <= 1e-5


# ------------------------------------------------------------------------------------------------
# learning-rate schedule
# ------------------------------------------------------------------------------------------------

BASE_LR, WARMUP, WARMUP_FACTOR = 0.01, 4, 0.001


def _expected_lr(n: int) -> float:
    """lr the optimizer used for iteration index n (0-based; metrics line `iter = n + 1` logs it).

    epochs = 2 with 6 iterations per epoch -> 12 iterations; lr /10 at round(12 * 8/12) = 8 and
    round(12 * 11/12) = 11; linear warm-up from BASE_LR * 0.001 over 4 iterations.
    """
    factor = 0.1 ** sum(n >= s for s in (8, 11))
    if n < WARMUP:
        alpha = n / WARMUP
        factor *= WARMUP_FACTOR * (1 - alpha) + alpha
    return BASE_LR * factor


@pytest.fixture(scope="module")
def schedule_run(tmp_path_factory, tiny_model_toml, tiny_shapes) -> Path:
    out = tmp_path_factory.mktemp("schedule")
    train(_opts(tiny_model_toml, tiny_shapes, out, epochs=2, max_iters=None, lr=BASE_LR, warmup_iters=WARMUP,
                warmup_factor=WARMUP_FACTOR, grad_clip=1.0))  # the whole 2-epoch schedule
    return out


def test_lr_warmup_then_step_decay(schedule_run):
    lines = run_metrics(schedule_run)
    assert [m["iter"] for m in lines] == list(range(1, 13))
    assert [m["epoch"] for m in lines] == [0] * 6 + [1] * 6
    lrs = [m["lr"] for m in lines]
    # by hand, the lr each iteration used: warm-up 0.001, 0.25075, 0.5005, 0.75025 x base;
    # then 1, 1, 1, 1; /10 from iteration index 8; /100 from 11
    hand = [0.00001, 0.0025075, 0.005005, 0.0075025, 0.01, 0.01, 0.01, 0.01, 0.001, 0.001, 0.001, 0.0001]
    assert lrs == pytest.approx(hand, rel=1e-9)
    assert lrs == pytest.approx([_expected_lr(n) for n in range(12)], rel=1e-9)
    config = json.loads((schedule_run / "config.json").read_text())
    assert config["lr_steps"] == [8, 11] and config["total_iters"] == 12


def test_max_iters_does_not_change_the_schedule(tmp_path, schedule_run, tiny_model_toml, tiny_shapes):
    train(_opts(tiny_model_toml, tiny_shapes, tmp_path, epochs=2, lr=BASE_LR, warmup_iters=WARMUP,
                warmup_factor=WARMUP_FACTOR, grad_clip=1.0, max_iters=3))
    assert [m["lr"] for m in run_metrics(tmp_path)] == pytest.approx([m["lr"] for m in run_metrics(schedule_run)][:3])


# ------------------------------------------------------------------------------------------------
# loading trained models, evaluation
# ------------------------------------------------------------------------------------------------

def test_load_trained_model_from_toml_path(straight_run):
    model, pre, ck = load_trained(straight_run / "final.pt")
    assert pre.min_size == 64
    assert _max_diff(model.state_dict(), ck["model_state"]) == 0.0


def test_load_trained_rejects_foreign_files(tmp_path, tiny_model_toml):
    torch.manual_seed(0)
    torch.save(build_detector(str(tiny_model_toml), 3).state_dict(), tmp_path / "plain.pt")
    with pytest.raises(UserError, match="not a defeat-cache training checkpoint"):
        load_trained(tmp_path / "plain.pt")


def test_evaluate_tiny_model(straight_run, tiny_model_toml, tiny_shapes):
    spec = load_model_spec(str(tiny_model_toml))
    model = build_detector(spec, 9)
    assert load_weights(model, straight_run / "final.pt") == "detector"
    val = load_dataset(tiny_shapes, "val")
    metrics = evaluate(model, val, spec.preprocessing, torch.device("cpu"), batch_size=4, workers=0)
    assert set(COCO_METRIC_NAMES) <= set(metrics) and "eval_seconds" in metrics
    for k in COCO_METRIC_NAMES:  # None: no ground truth in that area range
        assert metrics[k] is None or 0.0 <= metrics[k] <= 1.0
    assert not model.training


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def _invoke(args: list[str]):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def _last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def test_cli_models():
    from defeat_cache.models.zoo import list_models

    r = _invoke(["models"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert [line.split()[0] for line in lines] == list_models()
    assert any("r18q_fpn_cpu" in line and "resnet18/4" in line for line in lines)


def test_cli_data_shapes_and_info(tmp_path):
    r = _invoke(["data", "shapes", "--out", tmp_path / "d", "--train-images", 3, "--val-images", 2])
    assert r.exit_code == 0, r.output
    toml = Path(r.stdout.strip().splitlines()[-1])
    assert toml == tmp_path / "d" / "data.toml" and toml.is_file()
    assert len(list((tmp_path / "d" / "images" / "train").glob("*.png"))) == 3
    r = _invoke(["data", "info", toml, "--split", "val"])
    assert r.exit_code == 0, r.output
    assert "shapes/val: 2 images" in r.stdout and "fingerprint " in r.stdout


def test_cli_train_then_eval(tmp_path, tiny_shapes):
    """A zoo model (r18q_fpn_cpu), so that `eval` can rebuild it from the checkpoint."""
    run = tmp_path / "run"
    r = _invoke(["train", "--student", "r18q_fpn_cpu", "--data", tiny_shapes, "--out", run, "--max-iters", 2,
                 "--batch-size", 2, "--workers", 0, "--log-every", 1])
    assert r.exit_code == 0, r.output
    summary = _last_json(r.stdout)
    assert summary["iterations"] == 2 and Path(summary["final"]) == run / "final.pt"
    assert [m["iter"] for m in run_metrics(run)] == [1, 2]

    model, pre, ck = load_trained(run / "final.pt", "r18q_fpn_cpu")  # load_trained round trip
    from defeat_cache.models.zoo import load_model_spec
    assert pre == load_model_spec("r18q_fpn_cpu").preprocessing and ck["iteration"] == 2
    assert _max_diff(model.state_dict(), ck["model_state"]) == 0.0
    with pytest.raises(UserError, match="not 'r50_fpn'"):
        load_trained(run / "final.pt", "r50_fpn")

    out_json = tmp_path / "metrics" / "eval.json"
    r = _invoke(["eval", "--checkpoint", run / "final.pt", "--data", tiny_shapes, "--workers", 0,
                 "--batch-size", 3, "--json", out_json])
    assert r.exit_code == 0, r.output
    written = json.loads(out_json.read_text())
    assert set(COCO_METRIC_NAMES) <= set(written)
    assert f"AP     {100 * written['AP']:6.2f}" in r.stdout  # printed by name, x 100 (tests/test_eval_numbers.py)

    r = _invoke(["eval", "--checkpoint", run / "final.pt", "--data", tiny_shapes, "--model", "r50_fpn"])
    assert r.exit_code != 0 and "Traceback" not in r.output


@pytest.mark.parametrize("args", [
    ["train", "--student", "r18q_fpn_cpu", "--data", "{tmp}/missing.toml", "--out", "{tmp}/run"],
    ["train", "--student", "no_such_model", "--data", "{shapes}", "--out", "{tmp}/run"],
    ["eval", "--checkpoint", "{tmp}/missing.pt", "--data", "{shapes}"],
    ["data", "info", "{tmp}/missing.toml"],
    ["train", "--student", "r18q_fpn_cpu", "--data", "{shapes}", "--out", "{tmp}/run", "--sync-bn"],
])
def test_cli_user_errors_are_one_line(tmp_path, tiny_shapes, args):
    r = _invoke([a.format(tmp=tmp_path, shapes=tiny_shapes) for a in args])
    assert r.exit_code != 0
    assert isinstance(r.exception, SystemExit)  # handled by click, not an uncaught exception
    assert "Traceback" not in r.output
    err = r.stderr.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("Error: ")
    error_lines = [line for line in err if line.startswith("Error")]
    assert len(error_lines) == 1
    if "--sync-bn" in args:
        assert "needs CUDA" in error_lines[0]


def test_cli_train_usage_errors(tmp_path, tiny_shapes):
    r = _invoke(["train", "--student", "r18q_fpn_cpu", "--data", tiny_shapes, "--out", tmp_path,
                 "--set", "neck.alpha_bg=8"])
    assert r.exit_code == 2 and "--set overrides" in r.output
    r = _invoke(["train", "--student", "r18q_fpn_cpu", "--data", tiny_shapes, "--out", tmp_path,
                 "--storage-option", "endpoint_url=http://127.0.0.1:9000"])
    assert r.exit_code == 2 and "--storage-option applies to a --cache URL" in r.output
