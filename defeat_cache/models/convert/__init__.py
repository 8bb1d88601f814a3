"""Foreign detector checkpoints (mmdetection 2.x/3.x, detectron2) -> torchvision-format state dicts.

`recognise` tells a state dict's origin from its key names; `convert_state` maps every tensor
onto a zoo model's names and layouts (class rows reordered, background slots added, anchor
blocks permuted) or refuses with the list of what did not fit. docs/convert.md describes the
mapping and the zoo options that make the computation match the source's.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from torch import Tensor

from ...errors import UserError
from . import detectron2, mmdet
from .mapping import Conversion, TensorMap, check_complete, resnet_depth

#: `--from` names -> converter modules
SOURCES = {"mmdet": mmdet, "detectron2": detectron2}

_DEFAULTS = {"roi_align.aligned": False, "roi_align.sampling_ratio": 2, "anchors.round": True,
             "neck.extra_input": "p5", "neck.relu_before_p7": True, "backbone.stride_in_1x1": False,
             "input.std": [58.395, 57.12, 57.375]}


def recognise(state: dict) -> str | None:
    """'mmdet' / 'detectron2' for a state dict with their key names, None otherwise (torchvision's, ours)."""
    if any(k.startswith("backbone.body.") for k in state):
        return None
    for name, module in SOURCES.items():
        if module.recognise(state):
            return name
    return None


def _config_value(config: dict, dotted: str):
    table, key = dotted.split(".")
    value = config.get(table, {}).get(key, _DEFAULTS[dotted])
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else value


def computation_differences(source: str, spec) -> list[str]:
    """The zoo options where `spec` computes differently from the source's defaults (docs/convert.md)."""
    expected = SOURCES[source].COMPUTATION[spec.family]
    return [f"{key} = {_config_value(spec.config, key)!r} (the source's: {want!r})"
            for key, want in expected.items() if _config_value(spec.config, key) != want]


def convert_state(state: dict, source: str, target: dict[str, Tensor], family: str, *, spec=None,
                  meta: dict | None = None, channels: str | None = None, what: str = "this model") -> Conversion:
    """Converts `state` (a `source` checkpoint's tensors) for a model whose state dict is `target`.

    `channels` is the colour order the source's first convolution expects ("rgb" / "bgr"; default:
    what the source's metadata or conventions say); BGR weights have their input channels swapped,
    so the converted model takes RGB like every model here. With `spec`, `notes` lists where the zoo
    model computes differently from the source (RoIAlign, P6, anchors, stride placement, input std).
    """
    module = SOURCES[source]
    src_family = module.family_of(state)
    if src_family != family:
        raise UserError(f"{module.NAME} checkpoint is a {src_family} model; {what} is a {family} model")
    depth, target_depth = module.depth_of(state), resnet_depth(target, "backbone.body.layer3.", ".conv3.")
    if depth != target_depth:
        def name(d):
            return f"ResNet-{d}" if d else "a ResNet of another depth"
        raise UserError(f"{module.NAME} checkpoint has a {name(depth)} backbone; {what} has {name(target_depth)}")
    num_classes = module.num_classes_of(state, family)
    num_levels = 4 if family == "faster_rcnn" else 3
    tmap = TensorMap(state, f"{module.NAME}")
    module.map_tensors(tmap, family, num_classes, num_levels)
    channels = channels or module.default_channels(meta)
    notes = []
    if channels == "bgr":
        conv1 = "backbone.body.conv1.weight"
        tmap.out[conv1] = tmap.out[conv1].flip(1)  # BGR-trained filters applied to RGB input
        notes.append("input channels: BGR weights, first convolution's filters swapped to take RGB")
    converted = check_complete(tmap, target, what)
    if spec is not None:
        diffs = computation_differences(source, spec)
        if diffs:
            notes.append(f"{spec.name} computes differently from {module.NAME}: " + "; ".join(diffs)
                         + " (docs/convert.md: set these in the model TOML, or use a *_" +
                         ("mmdet" if source == "mmdet" else "d2") + " zoo entry)")
    return Conversion(state=converted, source=source, family=family, depth=depth, num_classes=num_classes,
                      class_names=module.class_names(meta), notes=notes)


# --------------------------------------------------------------------------------------------
# reading foreign files
# --------------------------------------------------------------------------------------------


class _ArraysOnly(pickle.Unpickler):
    """detectron2's model-zoo .pkl files: a dict of numpy arrays. Only numpy's array machinery may be
    reconstructed (the same rule `torch.load(weights_only=True)` applies to tensors)."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED or (module == "numpy" and name.endswith("DType")) \
                or module == "numpy.dtypes":
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are allowed)")


def read_pickle_weights(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArraysOnly(f, encoding="latin1").load()
    except Exception as e:
        raise UserError(f"{path}: not a readable weights pickle ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a dict of arrays, got {type(obj).__name__}")
    return obj


def state_and_meta(obj: dict) -> tuple[dict, dict | None]:
    """The weights and the metadata of an mmdetection (`state_dict`, `meta`) or detectron2 (`model`) file."""
    for key in ("state_dict", "model"):
        if isinstance(obj.get(key), dict):
            state = obj[key]
            break
    else:
        state = obj
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, obj.get("meta") if isinstance(obj.get("meta"), dict) else None


__all__ = ["Conversion", "SOURCES", "computation_differences", "convert_state", "read_pickle_weights", "recognise",
           "state_and_meta"]
