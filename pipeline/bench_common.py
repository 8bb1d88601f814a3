"""What every pipeline/bench_*.py script shares: logging, the JSON result line, common options,
the work folder, the synthetic dataset and the teacher checkpoint (trained or random).

Not a script; the benches put this folder on sys.path and import from here.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_TEACHER = REPO / "out" / "quickstart" / "teacher" / "final.pt"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def command_line() -> str:
    return shlex.join([sys.executable, *sys.argv])


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def emit(result: dict, json_path: str | None) -> None:
    text = json.dumps(result, sort_keys=False)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def add_common_args(ap: argparse.ArgumentParser, images: int) -> None:
    """The options every pipeline/bench_*.py script takes."""
    ap.add_argument("--images", type=int, default=images, help="synthetic train images (x views = items)")
    ap.add_argument("--teacher", default="r18_fpn_cpu")
    ap.add_argument("--teacher-checkpoint", default=None,
                    help="teacher weights; default out/quickstart/teacher/final.pt if present, else random init")
    ap.add_argument("--work", default=None, help="work folder (kept); default a temp folder, removed")
    ap.add_argument("--json", default=None, help="also write the JSON result here")


@contextmanager
def work_folder(given: str | None, prefix: str):
    """`given` (created, kept), else a temporary folder removed at the end."""
    work = Path(given) if given else Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    finally:
        if not given:
            shutil.rmtree(work, ignore_errors=True)


def make_dataset(work: Path, num_train: int, seed: int = 0) -> Path:
    """The synthetic shapes dataset (idempotent: reused when the same parameters exist)."""
    from defeat_cache.data.shapes import generate_shapes
    t0 = time.perf_counter()
    toml = generate_shapes(work / "data", num_train=num_train, num_val=8, seed=seed, progress=True)
    log(f"dataset: {num_train} train images at {toml} ({time.perf_counter() - t0:.1f}s)")
    return toml


def resolve_teacher_checkpoint(given: str | None, teacher: str, data_toml: Path, work: Path,
                               seed: int = 0) -> tuple[str, str]:
    """(checkpoint path, what it is): --teacher-checkpoint, else the quickstart's trained teacher,
    else a randomly initialised teacher saved to WORK (random weights give unrealistic feature
    statistics: codec errors and compression ratios are only indicative then)."""
    if given:
        if not Path(given).is_file():
            raise SystemExit(f"--teacher-checkpoint {given}: file not found")
        return str(Path(given).resolve()), "given (--teacher-checkpoint)"
    if QUICKSTART_TEACHER.is_file():
        return str(QUICKSTART_TEACHER), "trained (out/quickstart/teacher/final.pt)"
    import torch
    from defeat_cache.data.dataset import load_dataset
    from defeat_cache.models.zoo import build_detector
    path = work / f"{teacher}_random_seed{seed}.pt"
    if not path.is_file():
        torch.manual_seed(seed)
        model = build_detector(teacher, load_dataset(data_toml, "train").num_classes)
        torch.save(model.state_dict(), path)
    log(f"no trained teacher given and {QUICKSTART_TEACHER} absent: using a RANDOMLY initialised "
        f"{teacher} ({path})")
    return str(path), f"random init (seed {seed}); pass --teacher-checkpoint for realistic features"


def calibrate_norm_statistics(model, images: list, device) -> int:
    """Sets the running mean and variance of every BatchNorm layer of a randomly initialised
    detector's backbone from the activations it sees on `images` (one forward, layer after layer:
    each layer is set from its input before it normalises it); returns how many layers were set.

    Without it, a random ResNet's identity BatchNorm statistics let the activation variance
    roughly double at every residual block: a random r152_fpn's FPN features reach ~1e8, which
    no float16 codec or autocast can hold, where a trained teacher's are of order 1-10."""
    import torch
    from torchvision.ops import FrozenBatchNorm2d
    layers = [m for m in model.backbone.body.modules() if isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d))]

    def set_from_input(module, args):
        x = args[0].float()
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))

    handles = [m.register_forward_pre_hook(set_from_input) for m in layers]
    was_training = model.training
    try:
        model.eval().to(device)
        with torch.no_grad():
            image_list, _ = model.transform([im.to(device) for im in images])
            model.backbone.body(image_list.tensors)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return len(layers)


def load_teacher(name: str, checkpoint: str, num_classes: int, device):
    from defeat_cache.models.checkpoint import load_weights
    from defeat_cache.models.zoo import build_detector
    model = build_detector(name, num_classes)
    load_weights(model, checkpoint, backbone_only=False)
    return model.eval().to(device).requires_grad_(False)
