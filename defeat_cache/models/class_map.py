"""Fitting a checkpoint's class-dependent heads to a dataset's classes.

Our detectors have one class slot per dataset class, contiguous and background first: slot
i + 1 is the dataset's category `category_ids[i]` (data/records.py). torchvision's COCO
checkpoints instead have 91 slots indexed by COCO category id (0 = background, ten ids unused).
When the dataset's categories are COCO's (same ids, same names; a subset is fine), the slots
are selected by id: the rows of the classifier, the 4-row groups of the box regressor, and, in
RetinaNet's classification conv, the rows of every anchor. Otherwise the heads do not fit and
the caller decides: fine-tuning skips them, a teacher is refused (KD compares class scores).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import lru_cache

from torch import Tensor, nn

from ..errors import UserError
from .forward import is_retinanet
from .zoo import CONFIG_DIR

COCO_CATEGORIES_FILE = CONFIG_DIR / "coco_categories.toml"
COCO_SLOTS = 91  # torchvision's COCO heads: background + category ids 1..90

_FRCNN_CLS = "roi_heads.box_predictor.cls_score"
_FRCNN_BOX = "roi_heads.box_predictor.bbox_pred"
_RETINA_CLS = "head.classification_head.cls_logits"


@lru_cache(maxsize=1)
def coco_categories() -> dict[int, str]:
    """COCO category id -> name (configs/coco_categories.toml)."""
    with open(COCO_CATEGORIES_FILE, "rb") as f:
        return {int(k): v for k, v in tomllib.load(f)["categories"].items()}


def _same_name(a: str, b: str) -> bool:
    """Names compared as people write them: case, `_`, `-` and spaces do not matter."""
    def norm(s: str) -> str:
        return re.sub(r"[\s_\-]+", " ", s.strip().lower())
    return norm(a) == norm(b)


@dataclass(frozen=True)
class HeadLayout:
    """Where a detector's class-dependent rows are: (state-dict prefix, rows per class, row groups)."""

    parts: tuple[tuple[str, int, int], ...]  # (module prefix, rows per class, groups: anchors per cell or 1)

    @property
    def keys(self) -> list[str]:
        return [f"{p}.{t}" for p, _, _ in self.parts for t in ("weight", "bias")]


def head_layout(model: nn.Module) -> HeadLayout:
    """The class-dependent parameters of a detector built by models/zoo.py."""
    if is_retinanet(model):
        # torchvision views the conv's A*K outputs as [A, K]: anchor-major groups of K rows
        return HeadLayout(((_RETINA_CLS, 1, model.head.classification_head.num_anchors),))
    return HeadLayout(((_FRCNN_CLS, 1, 1), (_FRCNN_BOX, 4, 1)))


def state_classes(state: dict, layout: HeadLayout) -> int | None:
    """Classes (background slot included) of the heads in `state`, from the first head's bias."""
    prefix, per_class, groups = layout.parts[0]
    bias = state.get(f"{prefix}.bias")
    if not isinstance(bias, Tensor) or bias.dim() != 1 or bias.shape[0] % (per_class * groups):
        return None
    return bias.shape[0] // (per_class * groups)


def coco_slots(class_names: list[str], category_ids: list[int]) -> tuple[list[int] | None, str]:
    """The 91-slot rows of the dataset's classes, background first, when its categories are COCO's;
    else (None, why not)."""
    coco = coco_categories()
    for name, cid in zip(class_names[1:], category_ids):
        if cid not in coco:
            return None, f"category id {cid} ({name!r}) is not a COCO category id"
        if not _same_name(name, coco[cid]):
            return None, f"category id {cid} is {name!r}, COCO's is {coco[cid]!r}"
    return [0] + list(category_ids), ""


def select_class_rows(state: dict, layout: HeadLayout, slots: list[int], source_classes: int) -> dict:
    """`state` with each class-dependent tensor reduced to the rows of `slots` (in that order)."""
    out = dict(state)
    for prefix, per_class, groups in layout.parts:
        rows = [g * source_classes * per_class + s * per_class + r
                for g in range(groups) for s in slots for r in range(per_class)]
        for t in ("weight", "bias"):
            out[f"{prefix}.{t}"] = state[f"{prefix}.{t}"][rows].clone()
    return out


@dataclass
class ClassFit:
    """What `fit_class_heads` did: the state to load, and a sentence for the log (or "")."""

    state: dict
    note: str = ""
    mismatch: str = ""  # why the heads do not fit the dataset ("" when they do)


def fit_class_heads(state: dict, model: nn.Module, class_names: list[str], category_ids: list[int]) -> ClassFit:
    """Maps a COCO-id head onto a COCO-category dataset; says why when the heads cannot fit.

    Heads with the model's own class count load as they are (the contiguous layout).
    """
    layout = head_layout(model)
    target = model.state_dict()
    want = state_classes(target, layout)
    have = state_classes(state, layout)
    if have is None or have == want:
        return ClassFit(state)
    if have == COCO_SLOTS:
        slots, why = coco_slots(class_names, category_ids)
        if slots is not None:
            return ClassFit(select_class_rows(state, layout, slots, have),
                            note=f"mapped the checkpoint's {COCO_SLOTS} COCO-category-id class slots to the "
                                 f"dataset's {len(slots) - 1} categories by COCO category id (names checked)")
        return ClassFit(state, mismatch=f"the checkpoint's heads have {COCO_SLOTS} slots (COCO category ids) but "
                                        f"the dataset's categories are not COCO's ({why})")
    return ClassFit(state, mismatch=f"the checkpoint's heads have {have} classes, the dataset {want} "
                                    f"({want - 1} classes + background)")


def drop_class_heads(state: dict, model: nn.Module) -> tuple[dict, list[str]]:
    """`state` without the class-dependent parameters, and the module names left out."""
    layout = head_layout(model)
    keys = set(layout.keys)
    return {k: v for k, v in state.items() if k not in keys}, [p for p, _, _ in layout.parts]


def refuse_teacher_classes(path, mismatch: str) -> UserError:
    """The error for a teacher whose heads do not predict the dataset's classes."""
    return UserError(f"{path}: cannot be a teacher for this dataset: {mismatch}. Knowledge distillation "
                     "compares the teacher's and student's scores class by class, so the teacher must predict "
                     "the dataset's classes; fine-tune it on this dataset first (train --init-weights CKPT)")


__all__ = ["COCO_SLOTS", "ClassFit", "HeadLayout", "coco_categories", "coco_slots", "drop_class_heads",
           "fit_class_heads", "head_layout", "refuse_teacher_classes", "select_class_rows", "state_classes"]
