"""torchrun on CPU (gloo): extraction (ranks split whole shards; resume with another world size),
DDP training equal to single-process training, distributed evaluation."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import zarr

from defeat_cache.cache import TeacherCache
from defeat_cache.cache.extract import extract

from builders import (DEFAULT_PRE_NMS, cli_extract_argv, cli_extract_options, shapes_dataset, tiny_extract_options,
                      tiny_train_options, torchrun, write_model_toml)
from checks import assert_same_caches, run_metrics

# A launcher that can die like a killed process (os._exit, no cleanup) after N written shards.
LAUNCHER = textwrap.dedent("""
    import os, sys
    from defeat_cache.cache.writer import CacheWriter
    kill_after = int(os.environ.get("KILL_AFTER_SHARDS", "0"))
    if kill_after:
        real, written = CacheWriter.write_shard, [0]
        def write_then_die(self, shard, items):
            real(self, shard, items)
            written[0] += 1
            if written[0] >= kill_after:
                os._exit(9)
        CacheWriter.write_shard = write_then_die
    from defeat_cache.cli import main
    main(sys.argv[1:], prog_name="defeat-cache")
""")


def _launch(tmp_path: Path, nproc: int, args: list[str], env: dict | None = None):
    script = tmp_path / "launch.py"
    script.write_text(LAUNCHER)
    return torchrun([script, *args], env=env, nproc=nproc)


def _assert_same_cache(a: str, b: str) -> None:
    """Bit for bit: a shard's teacher batches come from that shard alone (extract.shard_batches)."""
    assert_same_caches(zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r"), atol=0)
    assert TeacherCache(a).manifest["complete"] and TeacherCache(b).manifest["complete"]


def test_two_rank_extraction_equals_one_process(tmp_path, reference_cache, tiny_model_toml,
                                                tiny_teacher_checkpoint, tiny_shapes):
    out = tmp_path / "two_ranks.zarr"
    r = _launch(tmp_path, 2, cli_extract_argv(tiny_model_toml, tiny_teacher_checkpoint, tiny_shapes, out))
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_cache(reference_cache, str(out))
    summaries = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # the job's totals, printed once: 12 images x 2 views in 5 shards
    assert summaries[0]["items"] == 24 and summaries[0]["written_shards"] == 5 and summaries[0]["ranks"] == 2


def test_killed_two_rank_run_resumes_with_one_process(tmp_path, reference_cache, tiny_model_toml,
                                                      tiny_teacher_checkpoint, tiny_shapes):
    out = tmp_path / "killed.zarr"
    r = _launch(tmp_path, 2, cli_extract_argv(tiny_model_toml, tiny_teacher_checkpoint, tiny_shapes, out),
                env={"KILL_AFTER_SHARDS": "1"})
    assert r.returncode != 0  # a rank died mid-run
    partial = TeacherCache(str(out), allow_incomplete=True)
    done = partial.inspect()["shards_done"]
    assert 1 <= done < partial.layout.num_shards and not partial.manifest["complete"]
    summary = extract(cli_extract_options(tiny_model_toml, tiny_teacher_checkpoint, tiny_shapes, out))
    assert summary["complete"] and summary["written_shards"] == partial.layout.num_shards - done
    _assert_same_cache(reference_cache, str(out))


def test_two_rank_ddp_training_from_one_cache(tmp_path, tiny_cache, tiny_student_toml, tiny_shapes):
    """torchrun + gloo: DistributedDataParallel over (student, adapters), each rank reading its
    own part of the same cache; rank 0 alone logs (losses averaged over ranks) and checkpoints;
    the evaluation after the last iteration splits the val images over the ranks."""
    cache = tiny_cache("fp16", False)
    out = tmp_path / "ddp"
    r = torchrun(["-m", "defeat_cache", "train", "--student", tiny_student_toml, "--data", tiny_shapes,
                  "--out", out, "--cache", cache, "--distill", "defeat", "--max-iters", "3",
                  "--batch-size", "2", "--workers", "0", "--log-every", "1", "--eval-every", "1"])
    assert r.returncode == 0, r.stderr[-3000:]
    summaries = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["iterations"] == 3  # one rank reports
    lines = [m for m in run_metrics(out) if "eval" not in m]
    assert [m["iter"] for m in lines] == [1, 2, 3]  # written once, by rank 0
    evals = [m for m in run_metrics(out) if "eval" in m]
    assert [m["iter"] for m in evals] == [3] and "AP" in evals[0]["eval"]
    assert summaries[0]["eval"] == evals[0]["eval"] and (out / "best.pt").is_file()
    assert {"loss_neck_obj", "loss_neck_bg", "loss_cls_pos", "loss_cls_neg"} <= set(lines[0])
    config = json.loads((out / "config.json").read_text())
    assert config["global_batch"] == 4  # 2 ranks x 2 images
    assert (out / "final.pt").is_file()


def _frozen_bn_student(folder: Path) -> Path:
    # Batch statistics are per rank under DDP (SyncBatchNorm needs CUDA), so the equality is
    # checked on a student without them: frozen BN, as the paper's ImageNet-initialised students.
    return write_model_toml(folder / "frozen_student.toml", backbone={"width_divisor": 8, "fpn_channels": 16,
                                                                        "norm": "frozen_bn"},
                            roi={"representation_size": 32})


def _weight_deltas(run: Path, init: dict) -> dict:
    import torch
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["train_state"]
    return {k: (v.double() - init[k].double()) for k, v in state.items() if v.dtype.is_floating_point}


def test_two_rank_ddp_steps_equal_single_process_steps(tmp_path, tiny_model_toml, tiny_teacher_checkpoint):
    """torchrun --nproc_per_node=2, 2 images per rank == one process with 4 images per step.

    Same init, same global batches (the ViewSampler's strides), per-image sampling seeds and
    DeFeat normalisers over the global batch: after 3 SGD steps every trained tensor (student
    and adapters) moved by the same amount. Images share one size so both runs pad alike.
    Also: a 1-process run stopped after 1 step and resumed on 2 ranks (same global batch; rank 0
    hands the checkpoint to rank 1) ends where the straight run does."""
    import torch

    from defeat_cache.distill.presets import load_preset
    from defeat_cache.engine.train import train

    data = shapes_dataset(tmp_path / "shapes", num_train=8, num_val=2, seed=3, min_side=80, max_side=80)
    cache = tmp_path / "cache.zarr"
    extract(tiny_extract_options(tiny_model_toml, tiny_teacher_checkpoint, data, cache, items_per_shard=4,
                                 pre_nms_top_n=DEFAULT_PRE_NMS))
    student = _frozen_bn_student(tmp_path)
    common = dict(cache=str(cache), warmup_iters=0, distill=load_preset("defeat"))

    def two_ranks(out: Path, *extra: str) -> None:
        r = torchrun(["-m", "defeat_cache", "train", "--student", student, "--data", data, "--out", out,
                      "--cache", cache, "--distill", "defeat", "--max-iters", "3", "--warmup-iters", "0",
                      "--batch-size", "2", "--workers", "0", "--log-every", "1", *extra])
        assert r.returncode == 0, r.stderr[-3000:]

    train(tiny_train_options(student, data, tmp_path / "single", batch_size=4, max_iters=3, **common))
    two_ranks(tmp_path / "ddp")
    train(tiny_train_options(student, data, tmp_path / "resumed", batch_size=4, max_iters=1, **common))
    two_ranks(tmp_path / "resumed", "--resume")
    lines = run_metrics(tmp_path / "resumed")
    assert [m["iter"] for m in lines] == [1, 2, 3]

    # the initial weights: what train() builds for seed 0 before its first step
    from defeat_cache.data.dataset import load_dataset
    from defeat_cache.distill.sources import build_teacher_source
    from defeat_cache.engine.train import TrainStep, initial_distiller, initial_student
    from defeat_cache.models.zoo import load_model_spec
    spec, ds = load_model_spec(str(student)), load_dataset(str(data), "train")
    preset = common["distill"]
    source = build_teacher_source(ds, spec, preset, torch.device("cpu"), cache=str(cache))
    init = TrainStep(initial_student(spec, ds.num_classes, 0),
                     initial_distiller(preset, spec, source.facts, 0)).state_dict()

    single = _weight_deltas(tmp_path / "single", init)
    for run in ("ddp", "resumed"):
        other = _weight_deltas(tmp_path / run, init)
        assert single.keys() == other.keys() and any(k.startswith("distiller.neck_adapters") for k in single)
        moved, worst = 0, 0.0
        for name, d1 in single.items():
            scale = d1.abs().max().item()
            if scale == 0:  # frozen (stem, BN buffers)
                assert other[name].abs().max().item() == 0, name
                continue
            moved += 1
            err = (other[name] - d1).abs().max().item()
            worst = max(worst, err / scale)
            assert err <= 1e-4 * scale, f"{run}: {name} update differs by {err:.3g} (update scale {scale:.3g})"
        assert moved > 20
        print(f"{run} vs single process: worst relative update difference {worst:.2e} over {moved} tensors")


EVAL_LAUNCHER = textwrap.dedent("""
    import sys, torch
    from defeat_cache import distributed as du
    from defeat_cache.data.dataset import load_dataset
    from defeat_cache.engine.evaluate import predict
    from defeat_cache.models.checkpoint import load_trained
    ckpt, data, dump = sys.argv[1:4]
    device = du.init_from_env("cpu")
    model, pre, _ = load_trained(ckpt)
    gathered = du.gather_to_main(predict(model, load_dataset(data, "val"), pre, device, 1, 0, False))
    if du.is_main_process():
        torch.save(gathered, dump)
    from defeat_cache.cli import main
    main(["eval", "--checkpoint", ckpt, "--data", data, "--batch-size", "1", "--workers", "0",
          "--json", dump + ".json", "--detections", dump + ".dets.json"], prog_name="defeat-cache")
""")


def test_two_rank_evaluation_equals_one_process(tmp_path, tiny_trained_checkpoint, tiny_shapes):
    """Each rank predicts its stride of the images; rank 0 gathers, scores and prints once."""

    import torch

    from defeat_cache.data.dataset import load_dataset
    from defeat_cache.engine.evaluate import evaluate, predict
    from defeat_cache.models.checkpoint import load_trained

    script, dump = tmp_path / "eval.py", tmp_path / "gathered.pt"
    script.write_text(EVAL_LAUNCHER)
    r = torchrun([script, tiny_trained_checkpoint, tiny_shapes, dump])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("COCO bbox (x 100)") == 1  # rank 0 alone prints the metrics

    model, pre, _ = load_trained(tiny_trained_checkpoint)
    val = load_dataset(tiny_shapes, "val")
    alone = predict(model, val, pre, torch.device("cpu"), 1, 0, False)
    gathered = sorted(torch.load(dump, weights_only=True), key=lambda p: p["image_index"])
    assert [p["image_index"] for p in gathered] == list(range(len(val.records))) == [p["image_index"] for p in alone]
    assert sum(len(p["boxes"]) for p in alone) > 0
    for a, b in zip(alone, gathered):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)
    metrics = evaluate(model, val, pre, torch.device("cpu"), 1, 0, False)
    written = json.loads(Path(str(dump) + ".json").read_text())
    assert {k: v for k, v in written.items() if k != "eval_seconds"} == \
        {k: v for k, v in metrics.items() if k != "eval_seconds"}
    assert f"AP     {100 * written['AP']:6.2f}" in r.stdout
    # --detections under torchrun: rank 0 writes every rank's detections, in COCO results format
    from defeat_cache.engine.evaluate import coco_detections
    dets = json.loads(Path(str(dump) + ".dets.json").read_text())
    assert len(dets) == sum(len(p["boxes"]) for p in alone)
    assert sorted((d["image_id"], d["category_id"], round(d["score"], 4)) for d in dets) == \
        sorted((d["image_id"], d["category_id"], round(d["score"], 4)) for d in coco_detections(val, alone))


FAULT_LAUNCHER = textwrap.dedent("""
    # Rank 1 alone meets a fault at its 2nd step: a Ctrl-C (FAULT=sigint) or a NaN loss (FAULT=nan).
    import os, signal, sys
    import torch
    from defeat_cache.engine import train as train_mod
    fault, calls = os.environ["FAULT"], [0]
    real_forward = train_mod.TrainStep.forward
    def forward(self, *args, **kwargs):
        losses = real_forward(self, *args, **kwargs)
        calls[0] += 1
        if os.environ["RANK"] == "1" and calls[0] == 2:
            if fault == "sigint":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                losses["loss_classifier"] = losses["loss_classifier"] * float("nan")
        return losses
    train_mod.TrainStep.forward = forward
    from defeat_cache.cli import main
    main(sys.argv[1:], prog_name="defeat-cache")
""")


@pytest.mark.parametrize("fault", ["sigint", "nan"])
def test_a_fault_on_one_rank_stops_every_rank_cleanly(tmp_path, fault, tiny_model_toml, tiny_shapes):
    """Ranks agree once per step: a Ctrl-C that reached rank 1 only stops both after the same
    step (checkpoint written, resumable); a NaN loss on rank 1 only ends both with the error,
    instead of one rank waiting in a collective the other never joins."""
    script = tmp_path / "fault.py"
    script.write_text(FAULT_LAUNCHER)
    out = tmp_path / "run"
    r = torchrun([script, "train", "--student", tiny_model_toml, "--data", tiny_shapes, "--out", out,
                  "--max-iters", "5", "--batch-size", "1", "--workers", "0", "--log-every", "1"],
                 env={"FAULT": fault}, timeout=180)
    from defeat_cache.models.checkpoint import read_checkpoint
    if fault == "sigint":
        assert r.returncode != 0, r.stderr[-3000:]  # a stopped run is not a finished one
        assert "stopped (SIGINT) at iteration 2/5" in r.stderr and "exitcode  : 130" in r.stderr
        assert read_checkpoint(out / "last.pt")["iteration"] == 2 and not (out / "final.pt").exists()
    else:
        assert r.returncode != 0
        assert "Error: at iteration 1, loss is nan" in r.stderr  # rank 1, its own numbers
        assert "Error: at iteration 1, the loss of another rank is not finite" in r.stderr  # rank 0
        assert "engine/train.py" not in r.stderr  # no traceback of ours (torchrun adds its own summary)
    assert not (out / "train.lock").exists()  # rank 0 released the job's run lock either way


def test_a_held_run_folder_refuses_every_rank(tmp_path, tiny_model_toml, tiny_shapes):
    """Rank 0 takes the run lock for its job; its refusal (another job holds the folder) reaches
    rank 1, and both stop with the one line before anything is written."""
    import socket
    import subprocess
    from defeat_cache.locking import LockHolder
    out = tmp_path / "run"
    out.mkdir()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        lock = LockHolder(socket.gethostname(), alive.pid, "2026-12-01T20:00:00+00:00", "b" * 32).to_bytes()
        (out / "train.lock").write_bytes(lock)
        r = torchrun(["-m", "defeat_cache", "train", "--student", tiny_model_toml, "--data", tiny_shapes,
                      "--out", out, "--max-iters", "1", "--batch-size", "1", "--workers", "0"], timeout=180)
    finally:
        alive.kill()
        alive.wait()
    assert r.returncode != 0
    refusal = f"Error: {out} is being trained by another process (host {socket.gethostname()}, pid {alive.pid},"
    assert r.stderr.count(refusal) == 2, r.stderr[-3000:]  # rank 0's and rank 1's
    assert sorted(p.name for p in out.iterdir()) == ["train.lock"] and (out / "train.lock").read_bytes() == lock
