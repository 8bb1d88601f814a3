"""A run folder's files under misuse: --resume with a changed computation is refused (saying what
differs), and a full disk during a checkpoint save says what is intact and leaves no partial file.

Runs are 1-2 iterations of the tiny models (batch 2, no workers)."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

from defeat_cache.distill.presets import load_preset
from defeat_cache.engine.run_files import check_resume_config
from defeat_cache.engine.train import train
from defeat_cache.errors import UserError
from defeat_cache.models.checkpoint import read_checkpoint

from builders import tiny_train_options


def _config(**options) -> dict:
    base = {"student": "tiny", "data": "d.toml", "out": "run", "epochs": None, "schedule": 1.0, "max_iters": 2,
            "batch_size": 2, "lr": None, "seed": 0, "device": "cpu", "workers": 2, "log_every": 20,
            "progress": True, "resume": False, "distill": None, "cache": None}
    return {"options": {**base, **options}, "model": {"name": "tiny", "config": {"roi": {"x": 1}}}, "lr": 0.0025,
            "lr_steps": [8, 11], "total_iters": 2, "global_batch": 2, "dataset_fingerprint": "abc"}


# ------------------------------------------------------------------------------------------------
# check_resume_config: what may change on --resume, and the one line saying what differs
# ------------------------------------------------------------------------------------------------

def test_resume_config_allows_what_does_not_change_the_computation():
    old = _config()
    new = _config(device="cuda", workers=0, log_every=1, progress=False, resume=True, max_iters=6, out="elsewhere",
                  data="moved/d.toml", student="path/tiny.toml", batch_size=1)  # batch: the global one is checked apart
    new["total_iters"] = 6
    check_resume_config(old, new, "run/config.json")


@pytest.mark.parametrize("change, expected", [
    ({"seed": 3}, "--seed 0 -> 3"),
    ({"lr": 0.01}, "--lr None -> 0.01"),
    ({"epochs": 24.0}, "--epochs None -> 24.0"),
    ({"schedule": 2.0}, "--schedule 1.0 -> 2.0"),
    ({"cache": "other.zarr"}, "--cache None -> 'other.zarr'"),
])
def test_resume_config_refuses_changed_options(change, expected):
    with pytest.raises(UserError) as e:
        check_resume_config(_config(), _config(**change), "run/config.json")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("run/config.json: --resume with a changed computation: ")
    assert expected in msg and "new --out" in msg


def test_resume_config_names_preset_and_set_differences():
    old = _config(distill=load_preset("defeat"))
    new = _config(distill=load_preset("defeat", ["neck.alpha_bg=8", "neck.enabled=false"]))
    with pytest.raises(UserError) as e:
        check_resume_config(json.loads(json.dumps(old)), new, "c.json")
    msg = str(e.value)
    assert "distill.neck.alpha_bg 16.0 -> 8.0" in msg and "distill.neck.enabled True -> False" in msg
    with pytest.raises(UserError, match="--distill None -> preset defeat"):
        check_resume_config(_config(), old, "c.json")


def test_resume_config_refuses_another_dataset_and_model():
    new = _config()
    new["dataset_fingerprint"] = "def"
    new["model"] = {"name": "tiny", "config": {"roi": {"x": 2}}}
    with pytest.raises(UserError) as e:
        check_resume_config(_config(), new, "c.json")
    assert "dataset fingerprint 'abc' -> 'def'" in str(e.value) and "student model.config.roi.x 1 -> 2" in str(e.value)


# ------------------------------------------------------------------------------------------------
# through train(): refused before anything is trained or rewritten
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_iteration_run(tmp_path_factory, tiny_model_toml, tiny_shapes) -> Path:
    out = tmp_path_factory.mktemp("run")
    train(tiny_train_options(tiny_model_toml, tiny_shapes, out, max_iters=1))
    return out


def test_train_resume_refuses_a_changed_seed_and_keeps_config(one_iteration_run, tiny_model_toml, tiny_shapes):
    config = (one_iteration_run / "config.json").read_text()
    with pytest.raises(UserError) as e:
        train(tiny_train_options(tiny_model_toml, tiny_shapes, one_iteration_run, max_iters=2, resume=True, seed=5,
                                 lr=0.5))
    assert "--seed 0 -> 5" in str(e.value) and "--lr None -> 0.5" in str(e.value)
    assert (one_iteration_run / "config.json").read_text() == config
    assert read_checkpoint(one_iteration_run / "last.pt")["iteration"] == 1


def test_train_resume_with_harmless_changes_continues(tmp_path, one_iteration_run, tiny_model_toml, tiny_shapes):
    run = tmp_path / "run"
    shutil.copytree(one_iteration_run, run)
    summary = train(tiny_train_options(tiny_model_toml, tiny_shapes, run, max_iters=2, resume=True, log_every=2,
                                       checkpoint_minutes=5.0))
    assert summary["iterations"] == 2
    assert json.loads((run / "config.json").read_text())["options"]["log_every"] == 2


def test_train_resume_with_a_preset_of_other_modules_is_refused(tmp_path, tiny_cache, tiny_student_toml,
                                                                tiny_shapes):
    """defeat has neck adapters, cls_decoupled none: refused by the config check, not a load_state_dict RuntimeError."""
    run = tmp_path / "run"
    cache = tiny_cache("fp32")
    train(tiny_train_options(tiny_student_toml, tiny_shapes, run, max_iters=1, distill=load_preset("defeat"),
                             cache=cache))
    with pytest.raises(UserError) as e:
        train(tiny_train_options(tiny_student_toml, tiny_shapes, run, max_iters=2, resume=True, cache=cache,
                                 distill=load_preset("cls_decoupled")))
    msg = str(e.value)
    assert "\n" not in msg and "distill.name 'defeat' -> 'cls_decoupled'" in msg and "description" not in msg
    assert "distill.neck.enabled True -> False" in msg


def test_train_state_that_does_not_fit_is_one_line(tmp_path, one_iteration_run, tiny_model_toml, tiny_shapes):
    """A last.pt whose training state lacks modules of this run (e.g. an edited config.json)."""
    run = tmp_path / "run"
    shutil.copytree(one_iteration_run, run)
    (run / "config.json").unlink()  # nothing to compare with: the state itself must not fit silently
    import torch

    ck = read_checkpoint(run / "last.pt")
    ck["train_state"] = {k: v for k, v in ck["train_state"].items() if "rpn" not in k}
    torch.save(ck, run / "last.pt")
    with pytest.raises(UserError) as e:
        train(tiny_train_options(tiny_model_toml, tiny_shapes, run, max_iters=2, resume=True))
    msg = str(e.value)
    assert "\n" not in msg and "last.pt" in msg and "missing" in msg


# ------------------------------------------------------------------------------------------------
# ENOSPC while writing a checkpoint
# ------------------------------------------------------------------------------------------------

def _torch_save_fails_after(monkeypatch, calls: int):
    """torch.save writes part of the file, then raises ENOSPC, from its `calls`-th call on."""
    import torch

    real_save, seen = torch.save, [0]

    def save(obj, path, *args, **kwargs):
        seen[0] += 1
        if seen[0] >= calls:
            Path(path).write_bytes(b"partial checkpoint bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_enospc_during_last_checkpoint_is_one_line(tmp_path, monkeypatch, one_iteration_run, tiny_model_toml,
                                                   tiny_shapes):
    run = tmp_path / "run"
    shutil.copytree(one_iteration_run, run)
    before = (run / "last.pt").read_bytes()
    _torch_save_fails_after(monkeypatch, 1)
    with pytest.raises(UserError) as e:
        train(tiny_train_options(tiny_model_toml, tiny_shapes, run, max_iters=2, resume=True))
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert "no space left" in msg.lower() and "last.pt" in msg
    assert "iteration 1 is intact" in msg and "--resume" in msg
    assert (run / "last.pt").read_bytes() == before
    assert not list(run.glob("*.partial"))


def test_enospc_during_final_checkpoint_then_resume_writes_it(tmp_path, monkeypatch, one_iteration_run,
                                                              tiny_model_toml, tiny_shapes):
    run = tmp_path / "run"
    shutil.copytree(one_iteration_run, run)
    (run / "final.pt").unlink()
    _torch_save_fails_after(monkeypatch, 2)  # last.pt is written, final.pt is not
    with pytest.raises(UserError) as e:
        train(tiny_train_options(tiny_model_toml, tiny_shapes, run, max_iters=2, resume=True))
    msg = str(e.value)
    assert "final.pt" in msg and "iteration 2 is intact" in msg and "--resume" in msg
    assert not list(run.glob("*.partial")) and not (run / "final.pt").exists()
    monkeypatch.undo()
    summary = train(tiny_train_options(tiny_model_toml, tiny_shapes, run, max_iters=2, resume=True))
    assert summary["iterations"] == 2
    assert read_checkpoint(run / "final.pt")["iteration"] == 2
