"""Whether a student can learn from a teacher with a preset, and which parts of the preset then run.

One rule, used by the distiller before training (distill/distiller.py) and by the recipe
planner before anything starts (pipeline/recipes.py), so the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ..errors import UserError
from ..models.family import FAMILIES
from ..models.zoo import ModelSpec
from .presets import FEATURE_KD_METHODS

# Presets whose RoI-classifier part is dropped, not refused, on a student without an RoI head.
# `defeat` is the paper's full recipe, and the paper's RetinaNet row is that recipe's neck
# part (docs/method.md). Any other preset asking for RoI KD there is refused: the user chose
# it for a part that would silently not run, so they turn it off themselves.
CLS_DROPPED_WITHOUT_ROI_HEAD = ("defeat",)


class IncompatibleError(UserError):
    """The student, teacher and preset do not go together; `problems` has one line per reason."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True)
class TeacherFacts:
    """What distillation knows of a teacher before the first batch: what a cache records of it,
    or what the online teacher's spec says. Compared by family, levels and stages; the channel
    counts (which size the adaptation layers) and the description ride along."""

    family: str  # "faster_rcnn" | "retinanet"
    fpn_levels: tuple[str, ...]  # names, finest first
    backbone_stages: tuple[str, ...]  # stages its outputs carry; () for a cache extracted without --backbone
    feature_channels: tuple[int, ...] = field(default=(), compare=False)  # per FPN level
    backbone_channels: dict = field(default_factory=dict, compare=False)  # stage name -> channels
    description: str = field(default="", compare=False)  # which cache or checkpoint, for the log

    @property
    def has_backbone(self) -> bool:
        return bool(self.backbone_stages)

    @classmethod
    def of_family(cls, family: str, backbone_stages: Iterable[str] = (), **extra) -> TeacherFacts:
        """A teacher known by its family name (the FPN levels are the family's)."""
        record = FAMILIES.get(family)
        levels = tuple(lv.name for lv in record.fpn_levels) if record else ()
        return cls(family, levels, tuple(backbone_stages), **extra)

    @classmethod
    def of_spec(cls, spec: ModelSpec, with_backbone: bool = True, description: str = "") -> TeacherFacts:
        """A teacher model run online, or the cache `extract` makes of it (`with_backbone`: --backbone)."""
        stages = spec.cached_backbone_stages if with_backbone else ()
        return cls(spec.family, tuple(lv.name for lv in spec.fpn_levels), tuple(s.name for s in stages),
                   feature_channels=tuple(lv.channels for lv in spec.fpn_levels),
                   backbone_channels={s.name: s.channels for s in stages}, description=description)


@dataclass(frozen=True)
class Compatibility:
    """The parts of the preset that run for this student and teacher."""

    neck: bool
    cls: bool
    backbone: bool
    notes: tuple[str, ...] = ()  # parts the preset enables that do not apply here, for the log
    feature_kd: tuple[str, ...] = ()  # the other feature-KD methods that run (pkd, cwd, fgd, mgd)


def check_compatible(student: ModelSpec, teacher: ModelSpec | TeacherFacts, preset: dict) -> Compatibility:
    """The parts of `preset` that run; raises IncompatibleError listing every problem."""
    if isinstance(teacher, ModelSpec):
        teacher = TeacherFacts.of_spec(teacher)
    name, neck, cls, bb = preset["name"], preset["neck"], preset["cls"], preset["backbone"]
    neck_on = bool(neck["enabled"]) and (neck["alpha_obj"] > 0 or neck["alpha_bg"] > 0)
    cls_on, bb_on = bool(cls["enabled"]), bool(bb["enabled"])
    feature_kd = tuple(m for m in FEATURE_KD_METHODS if preset.get(m, {}).get("enabled"))
    if teacher.family != student.family:
        raise IncompatibleError([f"teacher is {teacher.family}, student is {student.family}: "
                                 "DeFeat distils within one detector family"])
    problems, notes = [], []
    student_levels = tuple(lv.name for lv in student.fpn_levels)
    if (neck_on or feature_kd) and teacher.fpn_levels != student_levels:
        problems.append(f"the teacher outputs have FPN levels {list(teacher.fpn_levels)}, the student "
                        f"{list(student_levels)}: neck distillation pairs them level by level")
    if cls_on and not student.has_roi_head:
        title = student.family_record.title
        with_roi = " or ".join(f.title for f in FAMILIES.values() if f.has_roi_head)
        if not (neck_on or bb_on or feature_kd):
            problems.append(f"preset {name}: RoI-classifier KD needs a {with_roi} student ({title} has no "
                            "RoI head); use a preset with neck distillation")
        elif name in CLS_DROPPED_WITHOUT_ROI_HEAD:
            notes.append(f"{title} student: the preset's RoI-classifier part does not apply (no RoI head); "
                         f"distilling the neck/backbone parts, as the paper's {title} recipe")
            cls_on = False
        else:
            problems.append(f"preset {name} enables RoI-classifier KD but a {title} student has no RoI head "
                            f"(only {', '.join(CLS_DROPPED_WITHOUT_ROI_HEAD)} drops that part by itself); "
                            "turn it off with --set cls.enabled=false (in a recipe row: set = [\"cls.enabled=false\"])")
    if bb_on:
        if not teacher.backbone_stages:
            problems.append(f"preset {name} distils backbone stages but the cache has no backbone features; "
                            "extract it with --backbone (in a recipe: [extract] backbone = true)")
        else:
            allowed = [s.name for s in student.backbone_stages if s.name in teacher.backbone_stages]
            unknown = [s for s in bb["stages"] if s not in allowed]
            if unknown:
                problems.append(f"backbone.stages {unknown}: the teacher outputs provide only {allowed}")
    if problems:
        raise IncompatibleError(problems)
    return Compatibility(neck=neck_on, cls=cls_on, backbone=bb_on, notes=tuple(notes), feature_kd=feature_kd)


__all__ = ["CLS_DROPPED_WITHOUT_ROI_HEAD", "Compatibility", "IncompatibleError", "TeacherFacts", "check_compatible"]
