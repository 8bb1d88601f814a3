"""DeFeat distillation: teacher sources, the criterion and its loss functions.

- `sources`: where the teacher outputs come from (a cache, or a teacher run online).
- `distiller`: the criterion, the KD loss terms of a step from those outputs.
- `losses`, `masks`: the paper's loss functions and imitation masks it is built from.
- `feature_kd`: the other feature-KD methods one cache serves (PKD, CWD, FGD, MGD); `pkd_loss`
  and `cwd_loss` are public.
- `presets`: the named recipes (configs/distill/*.toml).
"""

from .distiller import Distiller, build_distiller
from .feature_kd import cwd_loss, pkd_loss
from .losses import (FeatureAdapters, all_cls_kd_loss, cls_kd_terms, decoupled_feature_loss, decoupled_kl_loss,
                     kl_div_with_temperature, neck_distill_loss, subsample_negatives)
from .sources import CachedViewDataset, CacheSource, OnlineSource, TeacherFacts, TeacherSource, build_teacher_source

__all__ = ["CacheSource", "CachedViewDataset", "Distiller", "FeatureAdapters", "OnlineSource", "TeacherFacts",
           "TeacherSource", "all_cls_kd_loss", "build_distiller", "build_teacher_source", "cls_kd_terms", "cwd_loss",
           "decoupled_feature_loss", "decoupled_kl_loss", "kl_div_with_temperature", "neck_distill_loss",
           "pkd_loss", "subsample_negatives"]
