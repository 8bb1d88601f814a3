"""What every converter shares: a record of where each source tensor went, and the class-row moves.

A converter renames most tensors one to one and rewrites the few whose rows mean classes or
anchors. `TensorMap` remembers which source keys it consumed, so a conversion can refuse a
checkpoint with tensors it did not understand, and `check_complete` refuses one that leaves
any of the target model's tensors unset: never a silent partial conversion.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ...errors import UserError
from ..state_diff import state_diff

#: BatchNorm step counters carry no weights (FrozenBatchNorm2d has none; BatchNorm2d restarts them).
COUNTER = "num_batches_tracked"

#: A class slot that must never win: sigmoid(-30) ~ 1e-13, far below any score threshold.
NEVER_LOGIT = -30.0


def as_tensor(value, key: str) -> Tensor:
    """Checkpoint values as float tensors (detectron2's model-zoo files hold numpy arrays)."""
    if isinstance(value, Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except Exception:
        raise UserError(f"checkpoint tensor {key!r} is a {type(value).__name__}, not an array") from None


class TensorMap:
    """Source tensors in, target tensors out, with a record of what was used."""

    def __init__(self, source: dict, origin: str):
        self.source = source
        self.origin = origin  # for messages: "mmdetection", "detectron2"
        self.used: set[str] = set()
        self.out: dict[str, Tensor] = {}

    def take(self, key: str) -> Tensor:
        self.used.add(key)
        return as_tensor(self.source[key], key)

    def put(self, target: str, tensor: Tensor) -> None:
        if target in self.out:
            raise UserError(f"{self.origin} checkpoint: two tensors map onto {target}")
        self.out[target] = tensor

    def rename(self, rules: list[tuple[str, str]]) -> None:
        """Moves every not-yet-used source key that matches a rule's pattern (fullmatch, first rule wins)."""
        compiled = [(re.compile(p), r) for p, r in rules]
        for key in list(self.source):
            if key in self.used:
                continue
            for pattern, replacement in compiled:
                if pattern.fullmatch(key):
                    self.put(pattern.sub(replacement, key), self.take(key))
                    break

    def skip(self, predicate) -> None:
        """Marks tensors that carry no weights (counters, derived buffers) as consumed."""
        for key in self.source:
            if predicate(key):
                self.used.add(key)

    def unused(self) -> list[str]:
        return sorted(k for k in self.source if k not in self.used)


def resnet_depth(state: dict, stage_prefix: str, conv3_key: str) -> int | None:
    """A ResNet's depth from its third stage's block count and block type (None if not a zoo depth)."""
    blocks = {k[len(stage_prefix):].split(".")[0] for k in state if k.startswith(stage_prefix)}
    bottleneck = any(k.startswith(stage_prefix) and conv3_key in k for k in state)
    return ({6: 50, 23: 101, 36: 152} if bottleneck else {2: 18, 6: 34}).get(len(blocks))


def summarise(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def check_complete(tmap: TensorMap, target: dict[str, Tensor], what: str) -> dict[str, Tensor]:
    """The converted state dict if it fills `target` exactly (names and shapes), else one UserError."""
    unused = tmap.unused()
    wanted = {k: v for k, v in target.items() if not k.endswith(COUNTER)}
    out = {k: v for k, v in tmap.out.items() if not k.endswith(COUNTER)}
    diff = state_diff(out, wanted)
    missing, extra, shapes = sorted(diff.missing), sorted(diff.extra), diff.shapes
    parts = []
    if unused:
        parts.append(f"{len(unused)} source tensors not understood: {summarise(unused)}")
    if extra:
        parts.append(f"{len(extra)} converted tensors the model lacks: {summarise(extra)}")
    if missing:
        parts.append(f"{len(missing)} model tensors the checkpoint lacks: {summarise(missing)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches: {summarise(shapes, 3)}")
    if parts:
        raise UserError(f"{tmap.origin} checkpoint does not convert to {what}: " + "; ".join(parts))
    # counters where the model has them (BatchNorm2d): zero, as a freshly built model's
    return {**{k: torch.zeros((), dtype=torch.long) for k in target if k.endswith(COUNTER)},
            **{k: out[k].to(target[k].dtype).contiguous() for k in wanted}}


# --------------------------------------------------------------------------------------------
# class and anchor rows
# --------------------------------------------------------------------------------------------


def background_last_to_first(t: Tensor) -> Tensor:
    """Softmax classifier rows [c1..cK, bg] (mmdetection 2.x/3.x, detectron2) -> [bg, c1..cK] (torchvision)."""
    return torch.cat([t[-1:], t[:-1]], dim=0)


def add_background_box_rows(t: Tensor, num_classes: int) -> Tensor:
    """Class-specific box regressor rows without a background slot (K*4) -> torchvision's (K+1)*4.

    torchvision never uses the background's 4 rows (zeros here). A class-agnostic regressor
    (4 rows) is repeated for every class: the same computation in torchvision's layout.
    """
    if t.shape[0] == 4 and num_classes > 1:
        t = t.repeat(num_classes, *([1] * (t.dim() - 1)))
    if t.shape[0] != 4 * num_classes:
        raise UserError(f"box regressor has {t.shape[0]} rows; expected {4 * num_classes} "
                        f"(4 per class for {num_classes} classes) or 4 (class-agnostic)")
    return torch.cat([torch.zeros_like(t[:4]), t], dim=0)


def add_background_per_anchor(t: Tensor, num_anchors: int, is_bias: bool) -> Tensor:
    """Sigmoid classifier rows [a0c1..a0cK, a1c1..] (no background) -> torchvision RetinaNet's
    [a0bg, a0c1..a0cK, a1bg, ...]: our RetinaNet counts background among its classes (slot 0,
    never a target), so its slot gets zero weights and a bias it can never win with."""
    per_anchor = t.reshape(num_anchors, -1, *t.shape[1:])
    bg = torch.zeros_like(per_anchor[:, :1])
    if is_bias:
        bg.fill_(NEVER_LOGIT)
    return torch.cat([bg, per_anchor], dim=1).reshape(-1, *t.shape[1:])


def anchors_size_major_to_ratio_major(t: Tensor, num_sizes: int, num_ratios: int) -> Tensor:
    """Per-anchor row blocks in detectron2's cell-anchor order (for size: for ratio) -> torchvision's
    (for ratio: for size). Each anchor owns an equal block of rows (its classes or its 4 deltas)."""
    blocks = t.reshape(num_sizes, num_ratios, -1, *t.shape[1:])
    return blocks.transpose(0, 1).reshape(-1, *t.shape[1:])


@dataclass
class Conversion:
    """A converted checkpoint: torchvision-format weights for one zoo model, and what was said about it."""

    state: dict[str, Tensor]
    source: str  # "mmdet" | "detectron2"
    family: str
    depth: int
    num_classes: int  # including background, as the zoo counts
    class_names: list[str] | None = None  # from the checkpoint's metadata, when it has them
    notes: list[str] = field(default_factory=list)  # what the log should say (computation differences, BGR)


__all__ = ["COUNTER", "Conversion", "NEVER_LOGIT", "TensorMap", "add_background_box_rows", "add_background_per_anchor",
           "anchors_size_major_to_ratio_major", "as_tensor", "background_last_to_first", "check_complete", "resnet_depth",
           "summarise"]
