"""Training runs one can watch and trust: evaluation during training (--eval-every, best.pt,
--keep-epochs), the run folder's hygiene (refused without --resume/--force, --force starting
over cleanly, one training job per folder: the run lock), impossible option values, Ctrl-C /
SIGTERM exit codes, the frozen-BN warning and the SGD flags.

Tiny Faster R-CNN on the tiny shapes dataset (12 train / 6 val images); batch 4 -> 3
iterations an epoch.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from defeat_cache.cli import main
from defeat_cache.engine import train as train_module
from defeat_cache.engine.metrics import COCO_METRIC_NAMES
from defeat_cache.engine.run_files import RUN_LOCK, RunLock
from defeat_cache.engine.run_log import RunLog
from defeat_cache.engine.schedule import plan_schedule
from defeat_cache.engine.train import train
from defeat_cache.errors import UserError
from defeat_cache.locking import LockHolder
from defeat_cache.models.checkpoint import read_checkpoint

from builders import tiny_train_options, write_model_toml
from checks import run_metrics

REPO = Path(__file__).resolve().parents[1]


def _opts(model_toml, data_toml, out, /, **overrides):
    return tiny_train_options(model_toml, data_toml, out, **{"warmup_iters": 1, **overrides})


def _invoke(args: list) -> object:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def _train_argv(model_toml, data_toml, out, *extra) -> list:
    return ["train", "--student", model_toml, "--data", data_toml, "--out", out, "--batch-size", 2,
            "--workers", 0, "--log-every", 1, "--warmup-iters", 1, *extra]


def _same_weights(a: Path, b: Path) -> bool:
    sa, sb = read_checkpoint(a)["model_state"], read_checkpoint(b)["model_state"]
    return sa.keys() == sb.keys() and all((sa[k] == sb[k]).all() for k in sa)


def _eval_lines(run: Path) -> list[dict]:
    return [m for m in run_metrics(run) if "eval" in m]


# ------------------------------------------------------------------------------------------------
# evaluation during training
# ------------------------------------------------------------------------------------------------

def test_eval_every_epoch_writes_metrics_tensorboard_and_best(tmp_path, tiny_model_toml, tiny_shapes):
    """2 epochs of 3 iterations, a real COCO eval on the 6 val images after each."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    schedule = dict(max_iters=None, epochs=2, batch_size=4)
    summary = train(_opts(tiny_model_toml, tiny_shapes, tmp_path, **schedule, eval_every=1, keep_epochs=True))
    # evaluating changes nothing of the training (RNG, train mode)
    train(_opts(tiny_model_toml, tiny_shapes, tmp_path / "no_eval", **schedule))
    assert _same_weights(tmp_path / "final.pt", tmp_path / "no_eval" / "final.pt")
    evals = _eval_lines(tmp_path)
    assert [(m["iter"], m["epoch"], m["epochs_done"]) for m in evals] == [(3, 0, 1.0), (6, 1, 2.0)]
    for m in evals:
        assert set(COCO_METRIC_NAMES) <= set(m["eval"]) and m["eval_seconds"] >= 0
        assert all(m["eval"][k] is None or 0.0 <= m["eval"][k] <= 1.0 for k in COCO_METRIC_NAMES)
    trained = [m for m in run_metrics(tmp_path) if "eval" not in m]
    assert [m["iter"] for m in trained] == [1, 2, 3, 4, 5, 6]
    times = [m["time"] for m in run_metrics(tmp_path)]
    assert times == sorted(times)  # eval lines carry the training time too

    # best.pt: the first evaluation with the highest AP, and that epoch's weights
    aps = [m["eval"]["AP"] for m in evals]
    best_index = aps.index(max(aps))
    best = read_checkpoint(tmp_path / "best.pt")
    assert best["best"]["AP"] == max(aps) and best["best"]["iter"] == evals[best_index]["iter"]
    assert _same_weights(tmp_path / "best.pt", tmp_path / f"epoch_{best_index + 1:02d}.pt")
    assert _same_weights(tmp_path / "final.pt", tmp_path / "epoch_02.pt")
    assert not _same_weights(tmp_path / "epoch_01.pt", tmp_path / "epoch_02.pt")
    assert summary["eval"] == evals[-1]["eval"]
    assert summary["best"] == {"AP": max(aps), "iter": evals[best_index]["iter"], "epoch": evals[best_index]["epoch"],
                               "path": str(tmp_path / "best.pt")}

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    for name in COCO_METRIC_NAMES:
        scalars = events.Scalars(f"val/{name}") if f"val/{name}" in events.Tags()["scalars"] else []
        # None (no ground truth in that area range) is not plotted
        assert [(e.step, pytest.approx(e.value)) for e in scalars] == \
            [(m["iter"], m["eval"][name]) for m in evals if m["eval"][name] is not None]
    assert "eval at iteration 3 (epoch 0, shapes/val): AP " in (tmp_path / "train.log").read_text()


def test_best_keeps_the_highest_ap_across_a_resume(tmp_path, tiny_model_toml, tiny_shapes, monkeypatch):
    """Scores given by hand (0.2, 0.5 | resume | 0.3): best.pt stays the epoch-2 model."""
    aps = iter([0.2, 0.5, 0.3])
    evaluated_at = []

    def fake_evaluate(model, data, pre, device, **kw):
        assert data.split == "val"
        evaluated_at.append(model.roi_heads.box_predictor.cls_score.weight.sum().item())
        return {"AP": next(aps), "AP50": 0.9, "APL": None, "eval_seconds": 0.0}

    monkeypatch.setattr(train_module, "evaluate", fake_evaluate)
    opts = dict(max_iters=6, epochs=3, batch_size=4, eval_every=1, keep_epochs=True)
    first = train(_opts(tiny_model_toml, tiny_shapes, tmp_path, **opts))
    assert first["best"]["iter"] == 6 and first["best"]["AP"] == 0.5
    summary = train(_opts(tiny_model_toml, tiny_shapes, tmp_path, **{**opts, "max_iters": None}, resume=True))
    assert [(m["iter"], m["eval"]["AP"]) for m in _eval_lines(tmp_path)] == [(3, 0.2), (6, 0.5), (9, 0.3)]
    assert summary["best"]["iter"] == 6 and summary["eval"]["AP"] == 0.3
    assert _same_weights(tmp_path / "best.pt", tmp_path / "epoch_02.pt")
    assert not _same_weights(tmp_path / "best.pt", tmp_path / "final.pt")
    assert len(set(evaluated_at)) == 3  # three different models were scored
    assert "(best AP 50.0 at iteration 6)" in (tmp_path / "train.log").read_text()


def test_lr_steps_in_epochs():
    s = plan_schedule(12, 2, epochs=2, schedule=1.0, max_iters=None, lr=0.01, lr_per_image=0.0,
                      lr_step_epochs=(1, 1.5))
    assert s.lr_steps == [6, 9] and s.total_iters == 12
    assert plan_schedule(12, 2, epochs=2, schedule=1.0, max_iters=None, lr=0.01, lr_per_image=0.0).lr_steps == [8, 11]


# ------------------------------------------------------------------------------------------------
# the run folder
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("marker", ["config.json", "last.pt", "metrics.jsonl", "final.pt"])
def test_a_run_folder_is_refused_without_resume_or_force(tmp_path, tiny_model_toml, tiny_shapes, marker):
    (tmp_path / marker).write_text("{}\n")
    with pytest.raises(UserError, match=rf"already holds a run \({marker}\); continue it with --resume, "
                                        r"start it over with --force"):
        train(_opts(tiny_model_toml, tiny_shapes, tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [marker]  # nothing written, nothing removed
    assert (tmp_path / marker).read_text() == "{}\n"


def test_force_starts_over_and_keeps_what_the_run_did_not_write(tmp_path, tiny_model_toml, tiny_shapes):
    old = {"config.json": "{}", "metrics.jsonl": '{"iter": 1, "loss": 9}\n{"iter": 2, "loss": 8}\n',
           "best.pt": "old", "epoch_07.pt": "old", "last.pt.partial": "old", "train.log": "OLD RUN\n",
           "tb/events.out.tfevents.1.old.0": "old"}
    foreign = {"notes.txt": "mine", "epoch_best_mine.pt": "mine", "tb/mine.txt": "mine"}
    for name, text in {**old, **foreign}.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    summary = train(_opts(tiny_model_toml, tiny_shapes, tmp_path, max_iters=1, force=True))
    assert summary["iterations"] == 1
    assert [m["iter"] for m in run_metrics(tmp_path)] == [1]  # started over, not appended
    for name, text in foreign.items():
        assert (tmp_path / name).read_text() == text
    for name in ("best.pt", "epoch_07.pt", "last.pt.partial", "tb/events.out.tfevents.1.old.0"):
        assert not (tmp_path / name).exists(), name
    log = (tmp_path / "train.log").read_text()
    assert "OLD RUN" not in log and "started over, removed the earlier run's" in log and "epoch_07.pt" in log
    assert read_checkpoint(tmp_path / "last.pt")["iteration"] == 1


@pytest.mark.parametrize("extra, message", [
    (["--max-iters", 0], "--max-iters 0: must be at least 1"),
    (["--epochs", 0], "--epochs 0.0: must be more than 0"),
    (["--schedule", -1], "--schedule -1.0: must be more than 0"),
    (["--lr", 0], "--lr 0.0: must be more than 0"),
    (["--lr", "nan"], "--lr nan: must be more than 0"),
    (["--momentum", 1], "--momentum 1.0: must be in [0, 1)"),
    (["--weight-decay", -1e-4], "--weight-decay -0.0001: must be 0 or more"),
    (["--warmup-iters", -1], "--warmup-iters -1: must be 0 or more"),
    (["--warmup-factor", 0], "--warmup-factor 0.0: must be in (0, 1]"),
    (["--grad-clip", -1], "--grad-clip -1.0: must be 0 or more (0 = no clipping)"),
    (["--log-every", 0], "--log-every 0: must be at least 1"),
    (["--checkpoint-minutes", 0], "--checkpoint-minutes 0.0: must be more than 0"),
    (["--eval-every", 0], "--eval-every 0: must be at least 1"),
    (["--lr-steps", "11,8"], "--lr-steps 11,8: must be increasing epochs > 0"),
    (["--lr-steps", "8,x"], "--lr-steps '8,x': 'x' is not a number"),
    (["--epochs", 12, "--lr-steps", "8,13"], "--lr-steps 8,13: 13 is past the run's 12 epochs"),
    (["--resume", "--force"], "--resume continues the run in --out and --force starts it over"),
])
def test_impossible_values_are_one_line_errors(tmp_path, tiny_model_toml, tiny_shapes, extra, message):
    r = _invoke(_train_argv(tiny_model_toml, tiny_shapes, tmp_path / "run", *extra))
    assert r.exit_code == 1 and "Traceback" not in r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and errors[0].startswith(f"Error: {message}"), r.stderr
    assert not (tmp_path / "run").exists()


def test_out_that_is_a_file_is_an_error(tmp_path, tiny_model_toml, tiny_shapes):
    (tmp_path / "run").write_text("a file")
    with pytest.raises(UserError, match="is a file; give a folder"):
        train(_opts(tiny_model_toml, tiny_shapes, tmp_path / "run"))


# ------------------------------------------------------------------------------------------------
# the run lock: one training job per run folder
# ------------------------------------------------------------------------------------------------

def _lock_naming(run: Path, pid: int) -> None:
    """RUN/train.lock naming process `pid` of this host as its holder (as that process would write it)."""
    run.mkdir(parents=True, exist_ok=True)
    holder = LockHolder(socket.gethostname(), pid, "2026-12-01T20:00:00+00:00", "a" * 32)
    (run / RUN_LOCK).write_bytes(holder.to_bytes())


def _folder_bytes(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _error_lines(r) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.startswith("Error")]


def test_a_second_train_is_refused_naming_the_holder_and_a_stale_lock_is_taken_over(tmp_path, tiny_model_toml,
                                                                                    tiny_shapes):
    run = tmp_path / "run"
    first = _invoke(_train_argv(tiny_model_toml, tiny_shapes, run, "--max-iters", 1))
    assert first.exit_code == 0, first.output
    assert RUN_LOCK not in os.listdir(run)  # released after a normal run
    alive = subprocess.Popen(["sleep", "30"])  # a live process of this host holds the run
    try:
        _lock_naming(run, alive.pid)
        before = _folder_bytes(run)
        for how in ([], ["--resume"], ["--force"]):
            r = _invoke(_train_argv(tiny_model_toml, tiny_shapes, run, "--max-iters", 2, *how))
            assert r.exit_code == 1 and "Traceback" not in r.output, (how, r.output)
            assert _error_lines(r) == [
                f"Error: {run} is being trained by another process (host {socket.gethostname()}, pid {alive.pid}, "
                f"started 2026-12-01T20:00:00+00:00); wait for it to finish, or if that process is gone, delete "
                f"{run / RUN_LOCK} and run again"], (how, r.stderr)
            assert _folder_bytes(run) == before, how  # nothing cleared, trimmed or written; the lock is theirs
    finally:
        alive.kill()
        alive.wait()
    # the holder is gone: its lock is stale, taken over with a note, and the run continues
    r = _invoke(_train_argv(tiny_model_toml, tiny_shapes, run, "--max-iters", 2, "--resume"))
    assert r.exit_code == 0, r.output
    assert [m["iter"] for m in run_metrics(run)] == [1, 2]
    assert f"took over the stale {RUN_LOCK} of a process that is gone (host {socket.gethostname()}, " \
           f"pid {alive.pid}," in (run / "train.log").read_text()
    assert RUN_LOCK not in os.listdir(run)


def test_a_folder_holding_only_a_stale_lock_is_a_fresh_run(tmp_path, tiny_model_toml, tiny_shapes):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _lock_naming(tmp_path, dead.pid)
    summary = train(_opts(tiny_model_toml, tiny_shapes, tmp_path, max_iters=1))  # no --force needed
    assert summary["iterations"] == 1 and (tmp_path / "final.pt").is_file()
    assert RUN_LOCK not in os.listdir(tmp_path)


@pytest.mark.parametrize("error, exit_code, message", [
    (UserError("the disk said no"), 1, "Error: the disk said no"),
    (KeyboardInterrupt(), 130, "Error: interrupted"),  # a second Ctrl-C aborts at once
], ids=["user_error", "keyboard_interrupt"])
def test_the_run_lock_is_released_when_training_fails(tmp_path, tiny_model_toml, tiny_shapes, monkeypatch,
                                                      error, exit_code, message):
    def fail(self, iteration, *args):
        raise error

    monkeypatch.setattr(RunLog, "write", fail)
    run = tmp_path / "run"
    r = _invoke(_train_argv(tiny_model_toml, tiny_shapes, run, "--max-iters", 2))
    assert r.exit_code == exit_code and _error_lines(r) == [message], r.output
    assert (run / "config.json").is_file() and RUN_LOCK not in os.listdir(run)


def test_a_refused_run_leaves_no_folder_and_no_lock(tmp_path, tiny_model_toml, tiny_shapes):
    """A UserError after the lock was taken (a --resume with a changed seed; a dataset that is not
    there) releases it; a folder only the lock had made goes with it."""
    train(_opts(tiny_model_toml, tiny_shapes, tmp_path, max_iters=1))
    before = _folder_bytes(tmp_path)
    with pytest.raises(UserError, match="--resume with a changed computation: --seed 0 -> 1"):
        train(_opts(tiny_model_toml, tiny_shapes, tmp_path, max_iters=2, resume=True, seed=1))
    after = _folder_bytes(tmp_path)
    assert after.pop("train.log").startswith(before.pop("train.log"))  # the refused attempt is logged
    assert after == before
    with pytest.raises(UserError):
        train(_opts(tiny_model_toml, tmp_path / "missing.toml", tmp_path / "new" / "run"))
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == []


def test_run_lock_refuses_a_second_holder_in_one_line(tmp_path):
    run = tmp_path / "run"
    with RunLock(run) as held:
        with pytest.raises(UserError) as e:
            RunLock(run).acquire()
        assert str(e.value) == (f"{run} is being trained by another process ({held.me.describe()}); wait for it "
                                f"to finish, or if that process is gone, delete {run / RUN_LOCK} and run again")
        assert os.listdir(run) == [RUN_LOCK]
    assert not run.exists()  # the folder the lock made, empty again, is removed


# ------------------------------------------------------------------------------------------------
# stopping: Ctrl-C and SIGTERM
# ------------------------------------------------------------------------------------------------

def test_ctrl_c_writes_last_pt_exits_130_and_resumes(tmp_path, tiny_model_toml, tiny_shapes, monkeypatch):
    """A Ctrl-C (SIGINT to this process, sent while the first metrics line is written) stops
    the run after the step in progress when it is seen (the second). The SGD flags reach the
    optimizer and config.json."""
    write = RunLog.write

    def write_then_interrupt(self, iteration, *args):
        write(self, iteration, *args)
        if iteration == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(RunLog, "write", write_then_interrupt)
    run = tmp_path / "run"
    sgd = ["--momentum", 0.8, "--weight-decay", 5e-4, "--lr-steps", "0.5,1", "--grad-clip", 0,
           "--checkpoint-minutes", 5, "--warmup-factor", 0.01]
    r = _invoke(_train_argv(tiny_model_toml, tiny_shapes, run, "--max-iters", 3, *sgd))
    assert r.exit_code == 130, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["stopped_by"] == "SIGINT" and summary["iterations"] == 2 and "final" not in summary
    last = read_checkpoint(run / "last.pt")
    assert last["iteration"] == 2 and not (run / "final.pt").exists()
    group = last["optimizer"]["param_groups"][0]
    assert group["momentum"] == 0.8 and group["weight_decay"] == 5e-4
    config = json.loads((run / "config.json").read_text())
    assert config["lr_steps"] == [3, 6] and config["options"]["grad_clip"] == 0  # 6 iterations an epoch
    assert config["options"]["checkpoint_minutes"] == 5 and config["options"]["warmup_factor"] == 0.01
    assert "grad_norm" not in run_metrics(run)[0]  # no clipping, no norm computed
    assert "stopped (SIGINT) at iteration 2/3" in (run / "train.log").read_text()
    assert RUN_LOCK not in os.listdir(run)  # released on the way out

    monkeypatch.setattr(RunLog, "write", write)
    r = _invoke(_train_argv(tiny_model_toml, tiny_shapes, run, "--max-iters", 3, "--resume", *sgd))
    assert r.exit_code == 0, r.output
    assert [m["iter"] for m in run_metrics(run)] == [1, 2, 3]


def test_sigterm_writes_last_pt_and_exits_143(tmp_path, tiny_model_toml, tiny_shapes):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "defeat_cache", *map(str, _train_argv(tiny_model_toml, tiny_shapes, run,
                                                                           "--max-iters", 500))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["stopped_by"] == "SIGTERM" and 1 <= summary["iterations"] < 500
    assert read_checkpoint(run / "last.pt")["iteration"] == summary["iterations"] == run_metrics(run)[-1]["iter"]
    assert "re-run with --resume to continue" in stderr
    assert RUN_LOCK not in os.listdir(run)


# ------------------------------------------------------------------------------------------------
# warnings
# ------------------------------------------------------------------------------------------------

def test_frozen_bn_without_init_weights_warns_once(tmp_path, tiny_shapes):
    model = write_model_toml(tmp_path / "frozen.toml", backbone={"norm": "frozen_bn"})
    train(_opts(model, tiny_shapes, tmp_path / "run", max_iters=1))
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("frozen BatchNorm") == 1 and "give --init-weights" in log
