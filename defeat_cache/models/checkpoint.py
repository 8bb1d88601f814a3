"""Checkpoint files: read any supported format (`read_weights`), load it into a detector
(`load_weights`, fitting class heads through models/class_map.py), write atomically, and the
trained-model format.

A trained model's checkpoint (`final.pt`; `last.pt` adds the training state) is written from
`trained_model_payload` and read back by `load_trained`: the one place that knows its keys.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..errors import UserError
from ..views import Preprocessing
from .class_map import drop_class_heads, fit_class_heads, refuse_teacher_classes
from .state_diff import state_diff
from .zoo import ModelSpec, build_detector, spec_dict


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_checkpoint(path: str | Path) -> dict:
    """The object in a checkpoint file, loaded with `weights_only=True`.

    torchvision's reference scripts store their command line as an `argparse.Namespace`
    (`args`); that one class is allowed through weights_only's safe globals, nothing else.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        text = str(e)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            raise UserError(f"{path}: holds a Python object of type {found.group(1)}, which loading with "
                            "weights_only refuses; save the weights alone (torch.save(model.state_dict(), ...)) "
                            "or a dict of them") from None
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {text[:200]})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a state dict or a defeat-cache checkpoint, got {type(obj).__name__}")
    return obj


@dataclass
class CheckpointWeights:
    """A checkpoint's detector (or ImageNet backbone) weights, whatever file format held them."""

    state: dict  # torchvision-format state dict, DDP's `module.` prefix removed
    source: str  # what the file was, for messages: "torchvision references checkpoint (epoch 25)"


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj) \
        and any(isinstance(v, torch.Tensor) for v in obj.values())


def _ours(obj: dict) -> CheckpointWeights | None:
    """Our training checkpoints (`final.pt`, `last.pt`: `trained_model_payload`)."""
    if isinstance(obj.get("model_state"), dict):
        model = obj.get("model") if isinstance(obj.get("model"), dict) else {}
        facts = [str(model["name"])] if "name" in model else []
        facts += [f"iteration {obj['iteration']}"] if "iteration" in obj else []
        what = f"defeat-cache training checkpoint ({', '.join(facts)})" if facts else "{'model_state': ...} checkpoint"
        return CheckpointWeights(obj["model_state"], what)
    return None


def _torchvision_references(obj: dict) -> CheckpointWeights | None:
    """torchvision's references/detection train.py: {'model', 'optimizer', 'lr_scheduler', 'args', 'epoch'}."""
    if _is_state_dict(obj.get("model")) and ("args" in obj or "optimizer" in obj):
        args = obj.get("args")
        arch = f", {args.model}" if isinstance(args, argparse.Namespace) and hasattr(args, "model") else ""
        return CheckpointWeights(obj["model"], f"torchvision references checkpoint (epoch {obj.get('epoch', '?')}{arch})")
    return None


def _wrapper(key: str):
    def recognise(obj: dict) -> CheckpointWeights | None:
        if _is_state_dict(obj.get(key)):
            return CheckpointWeights(obj[key], f"state dict in a {{'{key}': ...}} wrapper")
        return None
    recognise.__name__ = f"_{key}_wrapper"
    return recognise


def _plain(obj: dict) -> CheckpointWeights | None:
    return CheckpointWeights(obj, "plain state dict") if _is_state_dict(obj) else None


#: The checkpoint formats, tried in order; the first that recognises the loaded object wins.
#: A recogniser takes the loaded dict and returns CheckpointWeights or None. Converters of
#: other libraries' checkpoints (their own key names) go before the generic wrappers.
RECOGNISERS: list[Callable[[dict], CheckpointWeights | None]] = [
    _ours, _torchvision_references, _wrapper("state_dict"), _wrapper("model"), _plain]


def read_weights(path: str | Path) -> CheckpointWeights:
    """The one entry point for reading weights: any supported checkpoint file -> a state dict and what it was.

    mmdetection / detectron2 key names are converted by `load_weights`, which knows the model."""
    if Path(path).suffix == ".pkl":  # detectron2's model zoo: a pickle of numpy arrays, read as arrays only
        from .convert import read_pickle_weights, state_and_meta
        state, _ = state_and_meta(read_pickle_weights(Path(path)))
        return CheckpointWeights(state, "weights pickle")
    obj = read_checkpoint(path)
    for recognise in RECOGNISERS:
        found = recognise(obj)
        if found is not None:
            if any(k.startswith("module.") for k in found.state):  # saved from DDP
                found = CheckpointWeights({k.removeprefix("module."): v for k, v in found.state.items()},
                                          found.source + ", saved from DDP")
            return found
    raise UserError(f"{path}: no state dict found (top-level keys: {_summarise([str(k) for k in obj], 6)}); "
                    "expected a state dict, a {'model': ...} or {'state_dict': ...} wrapper, a torchvision "
                    "references checkpoint or a defeat-cache checkpoint")


def _summarise(keys: list[str], n: int = 4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


@dataclass
class LoadedWeights:
    """What `load_weights` loaded: `part` is "detector" or "backbone"; `notes` are for the log."""

    part: str
    source: str
    notes: list[str] = field(default_factory=list)
    converted_from: str | None = None  # "mmdet" / "detectron2": converted by models/convert

    def __str__(self) -> str:
        source = self.source + (f", converted from {self.converted_from}" if self.converted_from else "")
        return f"{self.part} weights ({source})" + "".join(f"; {n}" for n in self.notes)


def _imagenet_to_body(state: dict) -> dict:
    """An ImageNet classifier's state dict -> the detector body's keys (its classifier dropped)."""
    if any(k.startswith("features.") for k in state):  # torchvision MobileNetV3: the body is `features`
        return {f"backbone.body.{k.removeprefix('features.')}": v for k, v in state.items()
                if k.startswith("features.")}
    return {f"backbone.body.{k}": v for k, v in state.items() if not k.startswith("fc.")}


def load_weights(model: nn.Module, path: str | Path, backbone_only: bool | None = None, classes=None,
                 class_heads: str = "require", only: tuple[str, ...] | None = None) -> LoadedWeights:
    """Loads a full-detector checkpoint (any `read_weights` format), or ImageNet weights into the backbone body.

    `backbone_only=None` decides from the keys: an ImageNet ResNet has `conv1.`, `layer1.` ...
    and `fc.` (a MobileNetV3 `features.` and `classifier.`); a detector has `backbone.`.
    `classes` (a DetectionData or anything with `class_names` and `category_ids`) lets a
    91-slot COCO head map onto a COCO-category dataset (models/class_map.py). When the heads
    still do not fit, `class_heads="skip"` (fine-tuning) loads everything else and says which
    heads it skipped; `"require"` (a teacher) refuses with the reason. Any other key or shape
    mismatch is a one-line UserError naming the keys, never a silent partial load.

    `only` (state-dict prefixes, e.g. the RoI box head's): load and check just the keys under
    them, from a full-detector checkpoint (distill/head_teacher.py); the rest of the file and of
    `model` (which may sit on the meta device) is left alone.
    """
    weights = read_weights(path)
    state, notes = weights.state, []
    if only:
        backbone_only = False
    converted = None if backbone_only else foreign_source(state)
    if converted:  # mmdetection / detectron2 names and layouts -> this model's (models/convert)
        from .convert import convert_state
        from .family import family_of
        state = convert_state(state, converted, model.state_dict(), family_of(model).name, what="this model").state
        backbone_only = False
    if backbone_only is None:
        backbone_only = not any(k.startswith("backbone.") for k in state)
    if backbone_only:
        state = _imagenet_to_body(state)
        target = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.body.")}
    else:
        target = model.state_dict()
        if classes is not None:
            fit = fit_class_heads(state, model, list(classes.class_names), list(classes.category_ids))
            state = fit.state
            notes += [fit.note] if fit.note else []
            if fit.mismatch and class_heads == "require":
                raise refuse_teacher_classes(path, fit.mismatch)
            if fit.mismatch:
                state, skipped = drop_class_heads(state, model)
                target = {k: v for k, v in target.items() if not k.startswith(tuple(f"{p}." for p in skipped))}
                notes.append(f"skipped the class-dependent heads {', '.join(skipped)}, which start from their "
                             f"initialisation: {fit.mismatch}")
    if only:
        if not any(k.startswith(only) for k in state):
            raise UserError(f"{path}: has no {' / '.join(p + '*' for p in only)} weights ({weights.source}); "
                            "give the teacher's full detector checkpoint, the one the cache was extracted with")
        state = {k: v for k, v in state.items() if k.startswith(only)}
        target = {k: v for k, v in target.items() if k.startswith(only)}
    # torchvision's BatchNorm state has num_batches_tracked counters that FrozenBatchNorm2d
    # lacks (and the reverse): counters carry no weights, so they never decide a mismatch.
    counter = "num_batches_tracked"
    state = {k: v for k, v in state.items() if not (k.endswith(counter) and k not in target)}
    diff = state_diff(state, target)
    missing = [k for k in diff.missing if not k.endswith(counter)]
    unexpected, shapes = diff.extra, diff.shapes
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_summarise(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_summarise(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches: {_summarise(shapes, 2)}")
        kind = "ImageNet backbone" if backbone_only else "detector"
        raise UserError(f"{path}: does not fit this model as {kind} weights ({weights.source}); " + "; ".join(parts))
    model.load_state_dict(state, strict=False)  # completeness was checked above
    return LoadedWeights("backbone" if backbone_only else "detector", weights.source, notes, converted)


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


__all__ = ["RECOGNISERS", "CheckpointWeights", "LoadedWeights", "file_sha256", "load_trained", "load_weights",
           "read_checkpoint", "read_weights", "save_checkpoint", "trained_model_payload"]
