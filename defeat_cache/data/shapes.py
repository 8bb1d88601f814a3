"""Writes the synthetic shapes detection dataset, the project's built-in default, to a folder.

``generate_shapes(out_dir)`` renders the images (``shapes_render``: what they contain, how boxes
are measured, how each image is seeded) and writes them with COCO-format annotations and a
dataset TOML::

    out_dir/
      data.toml                      # format = "coco", [train], [val], [generator]
      annotations/train.json         # COCO: images / annotations / categories (ids from 1)
      annotations/val.json
      images/train/000000.png ...    # file_name in the JSON is relative to images/: "train/000000.png"
      images/val/000000.png ...

Generation is idempotent: a folder whose data.toml records the same parameters is reused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tomllib
from pathlib import Path

from PIL import Image

from .shapes_objects import CLASSES
from .shapes_render import EMPTY_EVERY, GENERATOR_VERSION, SPLITS, render_image

__all__ = ["CLASSES", "EMPTY_EVERY", "GENERATOR_VERSION", "generate_shapes", "render_image"]


def _params(num_train: int, num_val: int, seed: int, min_side: int, max_side: int) -> dict:
    return {
        "generator": "defeat_cache.data.shapes",
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "num_train": int(num_train),
        "num_val": int(num_val),
        "min_side": int(min_side),
        "max_side": int(max_side),
    }


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # JSON string escaping is valid TOML basic-string escaping


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _is_complete(out_dir: Path, params: dict) -> bool:
    toml_path = out_dir / "data.toml"
    try:
        with open(toml_path, "rb") as f:
            recorded = tomllib.load(f).get("generator")
    except (OSError, tomllib.TOMLDecodeError):
        return False
    if recorded != params:
        return False
    for split, n in (("train", params["num_train"]), ("val", params["num_val"])):
        if not (out_dir / "annotations" / f"{split}.json").is_file():
            return False
        if n > 0 and not (out_dir / "images" / split / f"{n - 1:06d}.png").is_file():
            return False
    return True


def generate_shapes(out_dir: str | Path, num_train: int = 1200, num_val: int = 200, seed: int = 0,
                    min_side: int = 160, max_side: int = 224, progress: bool = True) -> Path:
    """Writes the dataset and returns the path of its dataset TOML (out_dir/data.toml). Idempotent:
    if out_dir/data.toml exists and its recorded generation parameters match, returns it without regenerating."""
    if not (0 < min_side <= max_side):
        raise ValueError(f"need 0 < min_side <= max_side, got {min_side}, {max_side}")
    if min_side < 32:
        raise ValueError("min_side must be at least 32")
    if num_train < 0 or num_val < 0:
        raise ValueError("num_train and num_val must be >= 0")
    out_dir = Path(out_dir)
    toml_path = out_dir / "data.toml"
    params = _params(num_train, num_val, seed, min_side, max_side)
    if _is_complete(out_dir, params):
        return toml_path

    if toml_path.exists():
        toml_path.unlink()  # mark incomplete while (re)generating
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(CLASSES)]
    total = num_train + num_val
    done = 0
    t0 = time.monotonic()
    for split, n in (("train", num_train), ("val", num_val)):
        img_dir = out_dir / "images" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        keep = {f"{i:06d}.png" for i in range(n)}
        for stale in img_dir.glob("[0-9][0-9][0-9][0-9][0-9][0-9].png"):
            if stale.name not in keep:  # left over from a larger earlier generation
                stale.unlink()
        images, annotations = [], []
        for i in range(n):
            arr, objects = render_image(seed, split, i, min_side, max_side)
            name = f"{i:06d}.png"
            Image.fromarray(arr, "RGB").save(img_dir / name, format="PNG", compress_level=1)
            image_id = i + 1
            images.append({"id": image_id, "file_name": f"{split}/{name}",
                           "width": int(arr.shape[1]), "height": int(arr.shape[0])})
            for obj in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": obj["category_id"], "bbox": obj["bbox"],
                                    "area": obj["area"], "iscrowd": 0})
            done += 1
            if progress and (done % 50 == 0 or done == total):
                print(f"\rshapes: {done}/{total} images ({time.monotonic() - t0:.1f}s)",
                      end="\n" if done == total else "", file=sys.stderr, flush=True)
        coco = {
            "info": {"description": f"defeat-cache synthetic shapes ({split})",
                     "version": str(GENERATOR_VERSION), **{k: v for k, v in params.items() if k != "version"}},
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        _write_atomic(out_dir / "annotations" / f"{split}.json",
                      json.dumps(coco, separators=(",", ":")).encode())

    lines = [
        "# Synthetic shapes dataset written by defeat_cache.data.shapes.generate_shapes.",
        "# Paths are relative to this file's folder.",
        'format = "coco"',
        'name = "shapes"',
        "",
    ]
    for split in SPLITS:
        lines += [f"[{split}]", f'annotations = "annotations/{split}.json"', 'images = "images"', ""]
    lines.append("[generator]  # parameters used; regeneration is skipped when they match")
    lines += [f"{k} = {_toml_value(v)}" for k, v in params.items()]
    _write_atomic(toml_path, ("\n".join(lines) + "\n").encode())
    return toml_path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Generate the synthetic shapes detection dataset.")
    ap.add_argument("out_dir")
    ap.add_argument("--num-train", type=int, default=1200)
    ap.add_argument("--num-val", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-side", type=int, default=160)
    ap.add_argument("--max-side", type=int, default=224)
    a = ap.parse_args(argv)
    print(generate_shapes(a.out_dir, a.num_train, a.num_val, a.seed, a.min_side, a.max_side))


if __name__ == "__main__":
    main()
