"""`defeat-cache convert`: read an mmdetection or detectron2 file, convert it for a zoo model, write it."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ...errors import UserError
from ..checkpoint import read_checkpoint
from ..zoo import build_detector, load_model_spec
from . import SOURCES, convert_state, read_pickle_weights, recognise, state_and_meta


def read_foreign(path: str | Path) -> tuple[dict, dict | None]:
    """(state dict, metadata) of a checkpoint file: torch files with weights_only, .pkl as arrays only."""
    path = Path(path)
    if path.suffix == ".pkl":
        if not path.is_file():
            raise UserError(f"{path}: checkpoint not found")
        return state_and_meta(read_pickle_weights(path))
    return state_and_meta(read_checkpoint(path))


def convert_file(in_path: str | Path, source: str, model: str, out_path: str | Path,
                 channels: str | None = None) -> dict:
    """Converts `in_path` (a `source` checkpoint) into a torchvision-format state dict for zoo model
    `model` at `out_path`; returns a summary (classes, notes) for the command to print."""
    if source not in SOURCES:
        raise UserError(f"--from must be one of {', '.join(SOURCES)}, got {source!r}")
    state, meta = read_foreign(in_path)
    found = recognise(state)
    if found != source:
        said = f"looks like a {found} checkpoint" if found else "has neither mmdetection nor detectron2 key names"
        raise UserError(f"{in_path}: --from {source}, but the file {said}")
    spec = load_model_spec(model)
    num_classes = SOURCES[source].num_classes_of(state, SOURCES[source].family_of(state))
    with torch.device("meta"):  # names, shapes and dtypes only: nothing allocated or initialised
        target = build_detector(spec, num_classes).state_dict()
    conv = convert_state(state, source, target, spec.family, spec=spec, meta=meta, channels=channels,
                         what=f"--model {spec.name}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(out_path.suffix + ".partial")
    torch.save(conv.state, tmp)
    os.replace(tmp, out_path)
    return {"out": str(out_path), "model": spec.name, "source": source, "tensors": len(conv.state),
            "num_classes": conv.num_classes, "classes": conv.class_names, "notes": conv.notes}


__all__ = ["convert_file", "read_foreign"]
