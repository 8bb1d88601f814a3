"""Distillation presets: TOML files under configs/distill/, overridable with `--set a.b=value`."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

from ..data.dataset import read_toml
from ..data.records import DataError
from ..models.zoo import CONFIG_DIR

PRESET_DIR = CONFIG_DIR / "distill"
MASK_KINDS = ("gt", "fgfi", "gaussian", "random", "all")
# "all_*": the all-cls formula (paper Eq. 2: lam x mean KL_t, one temperature) over a subset of the sampled RoIs
CLS_MODES = ("decoupled", "all", "sub_negative", "all_positive", "all_negative", "all_sub_negative")
# whose proposals the cls KD RoIs are sampled from: the teacher's (cached with their logits) or the
# student's (scored by the teacher's box head during training: docs/method.md#kd-on-the-students-proposals)
CLS_ROIS = ("teacher", "student")

# The feature-KD methods besides DeFeat (docs/method.md#other-feature-kd-methods), one optional
# section each; a preset without the section gets these values (the authors' Faster R-CNN COCO
# settings), so `--set pkd.enabled=true` adds a method to any preset.
FEATURE_KD_DEFAULTS = {  # levels: how many of the finest FPN levels the method distils, 0 = all
    "pkd": {"enabled": False, "weight": 6.0, "levels": 4},
    "cwd": {"enabled": False, "weight": 10.0, "tau": 1.0, "levels": 0},
    "fgd": {"enabled": False, "temp": 0.5, "alpha": 5e-5, "beta": 2.5e-5, "gamma": 5e-5, "lambda": 5e-7, "levels": 4},
    "mgd": {"enabled": False, "alpha": 5e-7, "ratio": 0.45, "levels": 4},
}
FEATURE_KD_METHODS = tuple(FEATURE_KD_DEFAULTS)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def _toml_value(text: str):
    """The TOML literal `text` (8, 0.5, true, "gt", [..]); a bare word is the string itself."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _typed_value(old, text: str, assignment: str):
    """`text` as a value of the type of the preset value `old` it replaces: TOML's own
    `true`/`false` and the Python-style `True`/`False` both give a bool (a bare `False`
    string would be truthy), numbers must be numbers, lists lists. A string key also
    takes a number: `validate` decides (neck.finest_scale is "auto" or a number)."""
    what = f"--set {assignment}"
    if isinstance(old, bool):
        if text.lower() not in ("true", "false"):
            raise DataError(f"{what}: expected true or false (the preset's value is {str(old).lower()})")
        return text.lower() == "true"
    value = _toml_value(text)
    if isinstance(old, int):
        # a float too: a preset may write a weight as `16`; `validate` holds the integer keys to integers
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise DataError(f"{what}: expected an integer (the preset's value is {old})")
        return value
    if isinstance(old, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise DataError(f"{what}: expected a number (the preset's value is {old})")
        return float(value)
    if isinstance(old, list):
        if not isinstance(value, list):
            raise DataError(f"{what}: expected a list like {_toml_list(old)} (TOML syntax, quoted strings)")
        return value
    return value


def _toml_list(values: list) -> str:
    return "[" + ", ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in values) + "]"


def apply_override(preset: dict, assignment: str) -> None:
    """Sets one `SECTION.KEY=VALUE` in `preset`; the key must exist and the value keeps its type."""
    if "=" not in assignment:
        raise DataError(f"--set {assignment!r}: expected SECTION.KEY=VALUE, e.g. neck.alpha_bg=8")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = preset
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            raise DataError(f"--set {assignment!r}: preset has no section {p!r} (sections: "
                            f"{', '.join(k for k, v in preset.items() if isinstance(v, dict))})")
        node = node[p]
    if parts[-1] not in node:
        raise DataError(f"--set {assignment!r}: no key {parts[-1]!r} in [{'.'.join(parts[:-1])}] "
                        f"(keys: {', '.join(node)})")
    if isinstance(node[parts[-1]], dict):
        raise DataError(f"--set {assignment}: {key.strip()} is a section; set one of its keys "
                        f"({', '.join(f'{key.strip()}.{k}' for k in node[parts[-1]])})")
    node[parts[-1]] = _typed_value(node[parts[-1]], value.strip(), assignment)


def validate(preset: dict, source: str) -> dict:
    neck, cls, bb = preset.get("neck", {}), preset.get("cls", {}), preset.get("backbone", {})
    for sec in ("neck", "cls", "backbone", "teacher"):
        if not isinstance(preset.get(sec), dict):
            raise DataError(f"{source}: distillation preset needs a [{sec}] section")
    if neck["mask"] not in MASK_KINDS:
        raise DataError(f"{source}: neck.mask = {neck['mask']!r}; choose one of {', '.join(MASK_KINDS)}")
    if cls["rois"] not in CLS_ROIS:
        raise DataError(f"{source}: cls.rois = {cls['rois']!r}; choose one of {', '.join(CLS_ROIS)}")
    if cls["mode"] not in CLS_MODES:
        raise DataError(f"{source}: cls.mode = {cls['mode']!r}; choose one of {', '.join(CLS_MODES)}")
    fs = neck.get("finest_scale", "auto")
    if fs != "auto" and not (isinstance(fs, (int, float)) and fs > 0):
        raise DataError(f"{source}: neck.finest_scale must be \"auto\" or a positive number, got {fs!r}")
    for sec, keys in (("neck", ("alpha_obj", "alpha_bg")), ("backbone", ("alpha_obj", "alpha_bg")),
                      ("cls", ("beta_obj", "beta_bg", "t_obj", "t_bg", "lam", "t"))):
        for k in keys:
            v = preset[sec].get(k)
            if not isinstance(v, (int, float)) or v < 0:
                raise DataError(f"{source}: {sec}.{k} must be a number >= 0, got {v!r}")
    for method, defaults in FEATURE_KD_DEFAULTS.items():
        section = preset[method]
        unknown = sorted(set(section) - set(defaults))
        if unknown:
            raise DataError(f"{source}: [{method}] has no key {unknown[0]!r} (keys: {', '.join(defaults)})")
        if not isinstance(section["enabled"], bool):
            raise DataError(f"{source}: {method}.enabled must be true or false, got {section['enabled']!r}")
        if isinstance(section["levels"], bool) or not isinstance(section["levels"], int) or section["levels"] < 0:
            raise DataError(f"{source}: {method}.levels is a count of FPN levels (0 = all), got {section['levels']!r}")
        for k, v in section.items():
            if k != "enabled" and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
                raise DataError(f"{source}: {method}.{k} must be a number >= 0, got {v!r}")
    for method, key in (("cwd", "tau"), ("fgd", "temp")):
        if preset[method][key] <= 0:
            raise DataError(f"{source}: {method}.{key} must be > 0, got {preset[method][key]!r}")
    if preset["mgd"]["ratio"] >= 1:
        raise DataError(f"{source}: mgd.ratio is the fraction of cells masked, in [0, 1); got {preset['mgd']['ratio']!r}")
    if not isinstance(bb.get("stages"), list):
        raise DataError(f"{source}: backbone.stages must be a list like [\"c3\", \"c4\", \"c5\"]")
    for sec in ("neck", "cls", "backbone"):
        if not isinstance(preset[sec].get("enabled"), bool):
            raise DataError(f"{source}: {sec}.enabled must be true or false, got {preset[sec].get('enabled')!r}")
    for sec, k in (("cls", "positive_fraction"), ("cls", "fg_iou")):
        v = preset[sec].get(k)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1:
            raise DataError(f"{source}: {sec}.{k} must be a number in [0, 1], got {v!r}")
    for sec, k, least in (("cls", "rois_per_image", 0), ("teacher", "proposals", 1), ("teacher", "pre_nms_top_n", 1)):
        v = preset[sec].get(k)
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            raise DataError(f"{source}: {sec}.{k} must be an integer >= {least}, got {v!r}")
    return preset


def load_preset(name: str, overrides: tuple[str, ...] | list[str] = ()) -> dict:
    """A preset by name (configs/distill/NAME.toml) or path, with `--set` overrides applied."""
    path = Path(name)
    if path.suffix != ".toml":
        path = PRESET_DIR / f"{name}.toml"
        if not path.is_file():
            raise DataError(f"unknown distillation preset {name!r}; available: {', '.join(list_presets())}")
    preset = copy.deepcopy(read_toml(path, "distillation preset"))
    for method, defaults in FEATURE_KD_DEFAULTS.items():
        if not isinstance(preset.get(method, {}), dict):
            raise DataError(f"{path}: [{method}] must be a section")
        preset[method] = {**defaults, **preset.get(method, {})}
    if isinstance(preset.get("cls"), dict):
        preset["cls"].setdefault("rois", "teacher")
    for o in overrides:
        apply_override(preset, o)
    preset["name"] = path.stem
    preset["overrides"] = list(overrides)
    return validate(preset, str(path) + (f" with --set {' '.join(overrides)}" if overrides else ""))
