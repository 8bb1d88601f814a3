"""distill/compat.py: the one rule for which student, teacher and preset go together.

Only specs and presets: nothing is built. The distiller (tests/test_distill.py) and the recipe
planner (tests/test_recipes.py) both call this rule; here are its cases one by one.
"""

from __future__ import annotations

import pytest

from defeat_cache.distill.compat import IncompatibleError, TeacherFacts, check_compatible
from defeat_cache.distill.presets import list_presets, load_preset
from defeat_cache.errors import UserError
from defeat_cache.models.zoo import load_model_spec

FPN, RETINA = load_model_spec("r50_fpn"), load_model_spec("r50_retina")
FPN_TEACHER, RETINA_TEACHER = load_model_spec("r152_fpn"), load_model_spec("r152_retina")


def test_faster_rcnn_runs_every_part_a_preset_enables():
    for name in list_presets():
        preset = load_preset(name)
        parts = check_compatible(FPN, FPN_TEACHER, preset)
        assert (parts.cls, parts.backbone) == (preset["cls"]["enabled"], preset["backbone"]["enabled"]), name
        assert parts.neck == preset["neck"]["enabled"] and parts.notes == (), name


def test_retinanet_defeat_is_its_neck_part():
    parts = check_compatible(RETINA, RETINA_TEACHER, load_preset("defeat"))
    assert (parts.neck, parts.cls, parts.backbone) == (True, False, False)
    assert len(parts.notes) == 1
    assert parts.notes[0].startswith("RetinaNet student: the preset's RoI-classifier part does not apply")


def test_retinanet_refuses_other_presets_with_roi_kd():
    # defeat_backbone asks for RoI KD too: the user turns it off (the paper's "+backbone" RetinaNet row)
    with pytest.raises(IncompatibleError, match="cls.enabled=false") as e:
        check_compatible(RETINA, RETINA_TEACHER, load_preset("defeat_backbone"))
    assert len(e.value.problems) == 1 and "RoI head" in e.value.problems[0]
    parts = check_compatible(RETINA, RETINA_TEACHER, load_preset("defeat_backbone", ["cls.enabled=false"]))
    assert (parts.neck, parts.cls, parts.backbone) == (True, False, True) and parts.notes == ()
    with pytest.raises(IncompatibleError, match="cls.enabled=false"):
        check_compatible(RETINA, RETINA_TEACHER, load_preset("neck_decoupled_cls_all"))
    # a preset that is RoI KD only has nothing left to distil
    with pytest.raises(IncompatibleError, match="RoI.*neck distillation"):
        check_compatible(RETINA, RETINA_TEACHER, load_preset("cls_decoupled"))
    with pytest.raises(IncompatibleError, match="neck distillation"):
        check_compatible(RETINA, RETINA_TEACHER, load_preset("defeat", ["neck.enabled=false"]))


def test_no_distillation_across_families():
    for student, teacher in ((FPN, RETINA_TEACHER), (RETINA, FPN_TEACHER)):
        with pytest.raises(IncompatibleError, match="one detector family") as e:
            check_compatible(student, teacher, load_preset("neck_decoupled"))
        assert len(e.value.problems) == 1  # the other checks are moot


def test_backbone_parts_need_cached_stages():
    cache = TeacherFacts.of_spec(FPN_TEACHER, with_backbone=False)
    assert cache.backbone_stages == () and cache.fpn_levels == ("p2", "p3", "p4", "p5", "p6")
    with pytest.raises(IncompatibleError, match="--backbone.*backbone = true"):
        check_compatible(FPN, cache, load_preset("defeat_backbone"))
    assert check_compatible(FPN, cache, load_preset("defeat")).backbone is False
    # a cache (or online teacher) holds C3-C5: C2 is not there to imitate
    assert TeacherFacts.of_spec(FPN_TEACHER).backbone_stages == ("c3", "c4", "c5")
    with pytest.raises(IncompatibleError, match=r"backbone.stages \['c2'\].*\['c3', 'c4', 'c5'\]"):
        check_compatible(FPN, FPN_TEACHER, load_preset("defeat_backbone", ['backbone.stages=["c2", "c3"]']))


def test_facts_of_a_cache_by_family_and_every_problem_listed():
    cache = TeacherFacts.of_family("retinanet", {"c3": 512, "c4": 1024, "c5": 2048})
    assert cache == TeacherFacts.of_spec(RETINA_TEACHER)
    with pytest.raises(IncompatibleError) as e:
        check_compatible(RETINA, TeacherFacts.of_family("retinanet"), load_preset("defeat_backbone"))
    assert len(e.value.problems) == 2 and str(e.value) == "; ".join(e.value.problems)
    assert isinstance(e.value, UserError)  # the CLI prints it as one `Error:` line
    # FPN levels pair by stride: a teacher with only some of the student's levels distils those
    odd = TeacherFacts("faster_rcnn", ("p2", "p3"), ())
    parts = check_compatible(FPN, odd, load_preset("neck_decoupled"))
    assert parts.neck_pairs == ((0, 0), (1, 1))
    assert parts.notes == ("neck distillation on the FPN levels shared by stride (student<-teacher): p2<-p2, "
                           "p3<-p3; student levels p4, p5, p6 not distilled",)
    with pytest.raises(IncompatibleError) as e:  # none shared: refused, in one line
        check_compatible(FPN, TeacherFacts("faster_rcnn", ("p7",), ()), load_preset("neck_decoupled"))
    assert e.value.problems == ["the teacher's FPN levels [p7 (stride 128)] and the student's [p2 (stride 4), "
                                "p3 (stride 8), p4 (stride 16), p5 (stride 32), p6 (stride 64)] share no stride: "
                                "neck distillation pairs levels by stride"]


V2_TEACHER, MOBILENET = load_model_spec("r50_fpn_v2"), load_model_spec("mobilenet_v3_fpn")


def test_v2_teacher_to_v1_student_pairs_every_level():
    parts = check_compatible(FPN, V2_TEACHER, load_preset("defeat"))
    assert parts.neck_pairs == tuple((i, i) for i in range(5)) and parts.notes == ()
    assert (parts.neck, parts.cls, parts.backbone) == (True, True, False)


def test_mobilenet_student_distils_the_teachers_levels_at_its_strides():
    parts = check_compatible(MOBILENET, V2_TEACHER, load_preset("defeat"))
    # P5a and P5 (both stride 32) learn from the teacher's P5, P6 from P6
    assert parts.neck_pairs == ((0, 3), (1, 3), (2, 4))
    assert parts.notes == ("neck distillation on the FPN levels shared by stride (student<-teacher): p5a<-p5, "
                           "p5<-p5, p6<-p6; teacher levels p2, p3, p4 unused",)
    assert parts.cls  # same family: the RoI classifier part runs
    # the other way round (a MobileNet teacher, a ResNet student) pairs the student's P5 with the same name
    facts = TeacherFacts.of_spec(MOBILENET)
    assert facts.fpn_strides == (32, 32, 64) and facts.backbone_stages == ()  # no C3, C4 to cache
    assert check_compatible(FPN, facts, load_preset("defeat")).neck_pairs == ((3, 1), (4, 2))
    # backbone KD needs the stages a MobileNetV3 does not have
    with pytest.raises(IncompatibleError, match="no backbone features"):
        check_compatible(FPN, facts, load_preset("defeat_backbone"))
