"""Checkpoint files: load torchvision-format weights, write them atomically, and the trained-model format.

A trained model's checkpoint (`final.pt`; `last.pt` adds the training state) is written from
`trained_model_payload` and read back by `load_trained`: the one place that knows its keys.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..errors import UserError
from ..views import Preprocessing
from .zoo import ModelSpec, build_detector, spec_dict


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a state dict or a defeat-cache checkpoint, got {type(obj).__name__}")
    return obj


def _state_dict_of(obj: dict) -> dict:
    for key in ("model_state", "state_dict", "model"):  # ours, lightning/mmdet-style, torchvision refs
        if isinstance(obj.get(key), dict):
            return obj[key]
    return obj


def _summarise(keys: list[str], n: int = 4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_weights(model: nn.Module, path: str | Path, backbone_only: bool | None = None) -> str:
    """Loads a full-detector state dict, or ImageNet ResNet weights into the backbone body.

    `backbone_only=None` decides from the keys: a torchvision ImageNet ResNet has `conv1.`,
    `layer1.` ... and `fc.`; a detector has `backbone.`. Returns what was loaded. Any key or
    shape mismatch is a one-line UserError naming the keys, never a silent partial load.
    """
    if Path(path).suffix == ".pkl":  # detectron2's model zoo: a pickle of numpy arrays, read as arrays only
        from .convert import read_pickle_weights
        state = _state_dict_of(read_pickle_weights(Path(path)))
    else:
        state = _state_dict_of(read_checkpoint(path))
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DDP
    source = None if backbone_only else foreign_source(state)
    if source:  # mmdetection / detectron2 names and layouts -> this model's (models/convert)
        from .convert import convert_state
        from .family import family_of
        state = convert_state(state, source, model.state_dict(), family_of(model).name, what="this model").state
        backbone_only = False
    if backbone_only is None:
        backbone_only = not any(k.startswith("backbone.") for k in state)
    if backbone_only:
        state = {f"backbone.body.{k}": v for k, v in state.items() if not k.startswith("fc.")}
        target = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.body.")}
    else:
        target = model.state_dict()
    # torchvision's BatchNorm state has num_batches_tracked counters that FrozenBatchNorm2d
    # lacks (and the reverse): counters carry no weights, so they never decide a mismatch.
    counter = "num_batches_tracked"
    state = {k: v for k, v in state.items() if not (k.endswith(counter) and k not in target)}
    missing = [k for k in target if k not in state and not k.endswith(counter)]
    unexpected = [k for k in state if k not in target]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
              for k in target if k in state and state[k].shape != target[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_summarise(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_summarise(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches: {_summarise(shapes, 2)}")
        kind = "ImageNet backbone" if backbone_only else "detector"
        raise UserError(f"{path}: does not fit this model as {kind} weights; " + "; ".join(parts))
    model.load_state_dict(state, strict=False)  # completeness was checked above
    return "backbone" if backbone_only else (f"{source} detector" if source else "detector")


def foreign_source(state: dict) -> str | None:
    """'mmdet' / 'detectron2' when a state dict has their key names (models/convert), else None."""
    from .convert import recognise
    return recognise(state)


def save_checkpoint(path: str | Path, **payload) -> None:
    """Writes atomically (temp file + rename): a crash or a full disk leaves the previous checkpoint intact."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".partial")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk, Ctrl-C: no half-written file left behind
        tmp.unlink(missing_ok=True)
        raise


def trained_model_payload(spec: ModelSpec, num_classes: int, class_names: list[str], pre: Preprocessing,
                          iteration: int, model_state: dict, category_ids: list[int] | None = None) -> dict:
    """What `load_trained` (and `eval`, `export`, `predict`) need to rebuild a trained model: the
    whole of final.pt. `category_ids`: the dataset's id of each class (label i -> category_ids[i - 1])."""
    return dict(model=spec_dict(spec), num_classes=num_classes, class_names=class_names,
                category_ids=list(category_ids) if category_ids is not None else None,
                preprocessing=pre.to_dict(), iteration=iteration, model_state=model_state, version=__version__)


def load_trained(checkpoint: str | Path, model_name: str | None = None, device: str | torch.device = "cpu"):
    """(model, preprocessing, checkpoint dict) from a checkpoint written by training.

    The model takes raw images and preprocesses them itself (models.detector.ImageTransform);
    evaluation gives it views through models.detector.view_inputs. Every other checkpoint form:
    models.detector.load_detector."""
    ck = read_checkpoint(checkpoint)
    if "model_state" in ck:
        m = ck["model"]
        if model_name and m["name"] not in (model_name, Path(model_name).stem):
            raise UserError(f"{checkpoint}: holds a {m['name']!r} model, not {model_name!r}")
        # Rebuilt from what the checkpoint stores, so models given as TOML paths load too.
        spec = ModelSpec(name=m["name"], family=m["family"], config=m["config"],
                         preprocessing=Preprocessing.from_dict(ck["preprocessing"]))
        model = build_detector(spec, int(ck["num_classes"]))
        model.load_state_dict(ck["model_state"])
        from .detector import ImageTransform
        model.transform = ImageTransform(spec.preprocessing)
        return model.to(device), Preprocessing.from_dict(ck["preprocessing"]), ck
    raise UserError(f"{checkpoint}: not a defeat-cache training checkpoint (no 'model_state'); "
                    "use --init-weights to start training from foreign weights")


__all__ = ["file_sha256", "load_trained", "load_weights", "read_checkpoint", "save_checkpoint",
           "trained_model_payload"]
