"""pipeline/gpu_check.sh: the GPU readiness check runs end to end on the CPU (`--dry-run --device cpu`),
every step reports ok in its JSON line and the summary has every table; a step over its timeout
is reported as failed while the others still get their turn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "pipeline" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "pipeline"))

from gpu_check import STEPS  # noqa: E402


def _run(out: Path, *args: str, env: dict | None = None, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), str(out), "--device", "cpu", "--dry-run", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def _lines(text: str) -> list[dict]:
    return [json.loads(x) for x in text.splitlines() if x.startswith("{")]


def test_dry_run_passes_every_step(tmp_path):
    out = tmp_path / "gc"
    r = _run(out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    printed = _lines(r.stdout)
    assert [x["step"] for x in printed] == ["install", *STEPS]
    assert printed == _lines((out / "steps.jsonl").read_text())  # the same lines, kept
    for x in printed:
        assert x["ok"] is True and list(x)[:3] == ["step", "ok", "seconds"], x
        assert isinstance(x["seconds"], float) and "error" not in x and "failures" not in x, x
    by = {x["step"]: x for x in printed}
    assert by["env"]["device"] == "cpu" and by["env"]["dry_run"] and by["env"]["torch"]
    for mode in ("fp32", "amp"):  # on the CPU the cache step equals the online step exactly
        f = by["faithfulness"][mode]
        assert f["loss_rel_max"] <= by["faithfulness"]["bounds"][mode]["loss"]
        assert {"loss_neck_obj", "loss_neck_bg", "loss_cls_pos", "loss_cls_neg"} <= set(f["per_term"])
    assert by["faithfulness"]["amp_dtype"] == "bfloat16"  # CPU autocast really ran
    assert set(by["codecs"]["bounds"]) == {"fp16", "bf16", "int8", "compact"}
    assert all(by["codecs"][c]["items"] > 0 for c in by["codecs"]["bounds"])
    t = by["torchrun"]
    assert t["backend"] == "gloo" and t["world_size"] == 1 and t["extract"]["complete"]
    assert t["train"]["iterations"] == 2 and "--sync-bn needs CUDA" in t["sync_bn"]["error"]
    assert by["time_extract"]["extract_compact"]["items_per_s"] > 0
    modes = by["time_train"]["modes"]
    assert list(modes) == ["plain", "cache_fp16", "cache_compact", "in_memory", "online"]
    assert all(m["step_s"] > 0 and m["peak_gpu_MB"] is None for m in modes.values())
    assert by["time_train"]["ratios"]["cache_vs_online"] == round(modes["cache_fp16"]["step_s"] / modes["online"]["step_s"], 3)

    summary = (out / "summary.md").read_text()
    assert "all steps ok" in summary and "dry run" in summary
    assert all(f"| {s} | yes |" in summary for s in ["install", *STEPS])
    assert "| extract compact |" in summary and "| cache_compact |" in summary and "cache/online" in summary


def test_a_step_past_its_timeout_fails_alone(tmp_path):
    out = tmp_path / "gc"
    # every limit scaled to 1 s: the step is stopped while importing torch
    r = _run(out, "--steps", "faithfulness", env={"GPU_CHECK_TIMEOUT_SCALE": "0.001"}, timeout=300)
    assert r.returncode == 1
    lines = _lines((out / "steps.jsonl").read_text())
    assert [x["step"] for x in lines] == ["install", "faithfulness"]
    assert lines[1]["ok"] is False and lines[1]["error"] == "timed out after 1s"
    summary = (out / "summary.md").read_text()
    assert "NOT all steps ok" in summary and "| faithfulness | NO |" in summary and "| env | NO | - | did not run |" in summary

    bad = _run(out, "--steps", "nope", timeout=120)
    assert bad.returncode == 2 and "no step 'nope'" in bad.stderr
