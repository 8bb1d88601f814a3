"""One training step computed from two teacher sources, for comparing them term by term.

Invariant 1 of docs/design.md (a step from the cache equals the step with the teacher online)
is checked by building the same `TrainStep` twice, once per source, giving both the same
weights and samples, and comparing the loss terms and gradients. The test suite does it on the
CPU (tests/test_distill.py) and pipeline/gpu_check.py on a GPU, with and without AMP.
"""

from __future__ import annotations

import math

import torch

from ..data.records import DetectionData
from ..distill.sources import TeacherSource, build_teacher_source
from ..models.zoo import ModelSpec
from .train import TrainStep, initial_distiller, initial_student


def build_step(student: ModelSpec, data: DetectionData, preset: dict, device: torch.device, seed: int = 0,
               **source_args) -> tuple[TrainStep, TeacherSource]:
    """(TrainStep in train mode on `device`, its teacher source), built as `train()` builds them
    for run seed `seed`. `source_args`: cache=... (and teacher_head=... for cls.rois = "student") or teacher=..., teacher_checkpoint=..."""
    model = initial_student(student, data.num_classes, seed)
    source = build_teacher_source(data, student, preset, device, **source_args)
    distiller = initial_distiller(preset, student, source.facts, seed, source.roi_head)
    return TrainStep(model, distiller).to(device).train(), source


def losses_and_grads(step: TrainStep, source: TeacherSource, samples: list[dict], device: torch.device, *,
                     seed: int = 0, seeds: list[int] | None = None,
                     amp: bool = False) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """One forward and backward of `step` on `samples` (dataset samples of `source`): the loss
    terms as floats and every parameter's gradient (a copy on the CPU). `seed`: the global RNG's
    seed before the step; `seeds`: per-image sampling seeds (models/sampling.py); `amp`: the
    forward under torch.autocast on the device's type, as training runs it."""
    images = [s["image"].to(device) for s in samples]
    targets = [{"boxes": s["boxes"].to(device), "labels": s["labels"].to(device)} for s in samples]
    step.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast(device.type, enabled=amp):
        losses = step(images, targets, source.outputs(samples, images), seeds)
    sum(losses.values()).backward()
    grads = {n: p.grad.detach().cpu().clone() for n, p in step.named_parameters() if p.grad is not None}
    return {k: v.detach().double().item() for k, v in losses.items()}, grads


def deviations(ref: tuple[dict, dict], got: tuple[dict, dict]) -> dict[str, float]:
    """Per loss term its relative deviation |got - ref| / |ref|, and `grad_rel_max`: the largest
    gradient deviation, each tensor's max |got - ref| over its own max |ref|. A non-finite value
    on either side counts as an infinite deviation (a NaN would compare as no deviation)."""
    (ref_losses, ref_grads), (losses, grads) = ref, got
    if set(losses) != set(ref_losses) or set(grads) != set(ref_grads):
        raise ValueError(f"the two steps differ in their terms ({sorted(set(losses) ^ set(ref_losses))}) "
                         f"or trained parameters ({sorted(set(grads) ^ set(ref_grads))[:5]})")
    out = {name: _finite_or_inf(abs(losses[name] - ref) / max(abs(ref), 1e-12)) for name, ref in ref_losses.items()}
    worst = 0.0
    for name, g in ref_grads.items():
        scale = float(g.abs().max())
        err = float((grads[name] - g).abs().max())
        worst = max(worst, _finite_or_inf(err / scale if scale > 0 else err))
    out["grad_rel_max"] = worst
    return out


def _finite_or_inf(x: float) -> float:
    return x if math.isfinite(x) else math.inf


__all__ = ["build_step", "deviations", "losses_and_grads"]
