"""Extraction under torchrun (gloo on CPU): ranks split whole shards; resume with another world size."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr

from defeat_cache.cache.extract import ExtractOptions, extract
from defeat_cache.cache.store import TeacherCache

# A launcher that can die like a killed process (os._exit, no cleanup) after N written shards.
LAUNCHER = textwrap.dedent("""
    import os, sys
    from defeat_cache.cache import store
    kill_after = int(os.environ.get("KILL_AFTER_SHARDS", "0"))
    if kill_after:
        real, written = store.CacheWriter.write_shard, [0]
        def write_then_die(self, shard, items):
            real(self, shard, items)
            written[0] += 1
            if written[0] >= kill_after:
                os._exit(9)
        store.CacheWriter.write_shard = write_then_die
    from defeat_cache.cli import main
    main(sys.argv[1:], prog_name="defeat-cache")
""")


def _args(model, ckpt, data, out):
    return ["extract", "--teacher", str(model), "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out),
            "--codec", "fp32", "--proposals", "20", "--items-per-shard", "2", "--batch-size", "1",
            "--workers", "0"]


def _torchrun(tmp_path: Path, nproc: int, args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    script = tmp_path / "launch.py"
    script.write_text(LAUNCHER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=240)


def _assert_same_cache(a: str, b: str) -> None:
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    names = sorted(k for k, _ in ga.arrays())
    assert names == sorted(k for k, _ in gb.arrays())
    for sub in ("features",):
        for name, arr in ga[sub].arrays():
            np.testing.assert_allclose(arr[:], gb[sub][name][:], rtol=0, atol=1e-5, err_msg=f"{sub}/{name}")
    for name in ("rois", "meta", "shard_done"):
        np.testing.assert_allclose(ga[name][:], gb[name][:], rtol=0, atol=1e-5, err_msg=name)
    assert TeacherCache(a).manifest["complete"] and TeacherCache(b).manifest["complete"]


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory, tiny_model_toml, tiny_teacher_checkpoint, tiny_shapes) -> str:
    out = tmp_path_factory.mktemp("ref") / "one_process.zarr"
    extract(ExtractOptions(teacher=str(tiny_model_toml), checkpoint=str(tiny_teacher_checkpoint),
                           data=str(tiny_shapes), out=str(out), codec="fp32", proposals=20, items_per_shard=2,
                           batch_size=1, workers=0, progress=False))
    return str(out)


def test_two_rank_extraction_equals_one_process(tmp_path, reference_cache, tiny_model_toml,
                                                tiny_teacher_checkpoint, tiny_shapes):
    out = tmp_path / "two_ranks.zarr"
    r = _torchrun(tmp_path, 2, _args(tiny_model_toml, tiny_teacher_checkpoint, tiny_shapes, out))
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_cache(reference_cache, str(out))


def test_killed_two_rank_run_resumes_with_one_process(tmp_path, reference_cache, tiny_model_toml,
                                                      tiny_teacher_checkpoint, tiny_shapes):
    out = tmp_path / "killed.zarr"
    r = _torchrun(tmp_path, 2, _args(tiny_model_toml, tiny_teacher_checkpoint, tiny_shapes, out),
                  env={"KILL_AFTER_SHARDS": "1"})
    assert r.returncode != 0  # a rank died mid-run
    partial = TeacherCache(str(out), allow_incomplete=True)
    done = partial.inspect()["shards_done"]
    assert 1 <= done < partial.layout.num_shards and not partial.manifest["complete"]
    summary = extract(ExtractOptions(teacher=str(tiny_model_toml), checkpoint=str(tiny_teacher_checkpoint),
                                     data=str(tiny_shapes), out=str(out), codec="fp32", proposals=20,
                                     items_per_shard=2, batch_size=1, workers=0, progress=False))
    assert summary["complete"] and summary["written_shards"] == partial.layout.num_shards - done
    _assert_same_cache(reference_cache, str(out))


def test_two_rank_ddp_training_from_one_cache(tmp_path, tiny_cache, tiny_student_toml, tiny_shapes):
    """torchrun + gloo: DistributedDataParallel over (student, adapters), each rank reading its
    own part of the same cache; rank 0 alone logs (losses averaged over ranks) and checkpoints."""
    import json
    cache = tiny_cache("fp16", False)
    out = tmp_path / "ddp"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
              "defeat_cache", "train", "--student", str(tiny_student_toml), "--data", str(tiny_shapes),
              "--out", str(out), "--cache", str(cache), "--distill", "defeat", "--max-iters", "3",
              "--batch-size", "2", "--workers", "0", "--log-every", "1"]
    r = subprocess.run(launch, capture_output=True, text=True, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    summaries = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["iterations"] == 3  # one rank reports
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iter"] for m in lines] == [1, 2, 3]  # written once, by rank 0
    assert {"loss_neck_obj", "loss_neck_bg", "loss_cls_pos", "loss_cls_neg"} <= set(lines[0])
    config = json.loads((out / "config.json").read_text())
    assert config["global_batch"] == 4  # 2 ranks x 2 images
    assert (out / "final.pt").is_file()
