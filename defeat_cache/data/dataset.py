"""Dataset TOMLs, image decoding and the (image, view) dataset every stage iterates."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from PIL import Image

from ..views import Preprocessing, ViewGeometry, ViewSet, apply_view
from .coco import load_coco
from .records import DataError, DetectionData, ImageRecord
from .voc import VOC_CLASSES, load_voc


def read_toml(path: str | Path, what: str = "TOML") -> dict:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise DataError(f"{path}: invalid TOML ({e})") from None
    except UnicodeDecodeError as e:  # tomllib decodes the bytes itself and lets this through
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); TOML files must be saved as UTF-8") from None


def _path_value(section: dict, key: str, toml_path: Path, split: str) -> str | None:
    """A path given in a dataset TOML's [split] section (relative to the TOML's folder), or None."""
    value = section.get(key)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{toml_path}: [{split}] {key} must be a path string (relative to the TOML's folder), "
                        f"got {value!r}")
    return value


def load_dataset(toml_path: str | Path, split: str = "train") -> DetectionData:
    """Reads a dataset TOML (paths relative to its folder) and returns one split's records."""
    toml_path = Path(toml_path).resolve()
    spec = read_toml(toml_path, "dataset TOML")
    base = toml_path.parent
    fmt = spec.get("format", "coco")
    name = spec.get("name", toml_path.stem)
    section = spec.get(split)
    if not isinstance(section, dict):
        have = [k for k, v in spec.items() if isinstance(v, dict) and k != "generator"]
        raise DataError(f"{toml_path}: no [{split}] section (has: {', '.join(have) or 'none'})")
    if fmt == "coco":
        annotations = _path_value(section, "annotations", toml_path, split)
        if annotations is None:
            raise DataError(f"{toml_path}: [{split}] needs 'annotations' (path to a COCO json)")
        images = _path_value(section, "images", toml_path, split)
        return load_coco(base / annotations, base / images if images else None, name, split)
    if fmt == "voc":
        roots = section.get("root", spec.get("root"))
        if roots is None or "image_set" not in section:
            raise DataError(f"{toml_path}: [{split}] needs 'root' (VOC20xx folder or a list) and 'image_set'")
        roots = [roots] if isinstance(roots, str) else roots
        if not isinstance(roots, list) or not all(isinstance(r, str) for r in roots) \
                or not isinstance(section["image_set"], str):
            raise DataError(f"{toml_path}: [{split}] root must be a path string or a list of them and image_set "
                            f"a name, got root = {roots!r}, image_set = {section['image_set']!r}")
        classes = tuple(spec.get("classes", VOC_CLASSES))
        return load_voc([base / r for r in roots], section["image_set"], name, split, classes)
    raise DataError(f"{toml_path}: format = {fmt!r} is not supported (use \"coco\" or \"voc\")")


# PIL modes of one 16-bit channel (16-bit grey PNG, TIFF): scaled to 8 bits, since PIL's own
# convert("RGB") clips them at 255 (a 16-bit photo would become almost all white).
_16_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _rgb8(im: Image.Image, record: ImageRecord) -> np.ndarray:
    """uint8 [H, W, 3] of a decoded image of any 8- or 16-bit PIL mode."""
    if im.mode in _16_BIT_MODES or (im.mode == "I" and im.format == "PNG"):  # older PIL: 16-bit PNG as "I"
        grey = (np.asarray(im).astype(np.uint32) * 255 + 32767) // 65535  # 65535 -> 255, rounded
        return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)
    if im.mode in ("I", "F"):  # 32-bit integer or float pixels: no known range to scale from
        raise DataError(f"{record.file}: image id {record.image_id} has pixel mode {im.mode} "
                        f"({'32-bit float' if im.mode == 'F' else '32-bit integer'}); convert it to 8-bit RGB "
                        "(or 16-bit PNG) first")
    if im.mode in ("P", "PA"):  # through RGBA: PIL warns on palette transparency otherwise
        im = im.convert("RGBA")
    # 16-bit-per-channel RGB(A) PNGs PIL already decodes as 8-bit RGB(A) (the high byte of each value)
    return np.array(im.convert("RGB"))


def read_image(record: ImageRecord) -> torch.Tensor:
    """Decodes one image to uint8 RGB [3, H, W] (grey, palette, alpha, CMYK and 16-bit images
    converted, high bit depths scaled); a clear error names the image if it cannot."""
    try:
        with Image.open(record.file) as im:
            image = torch.from_numpy(_rgb8(im, record)).permute(2, 0, 1).contiguous()
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for missing, truncated, foreign files
        raise DataError(f"{record.file}: cannot read image id {record.image_id} ({e})") from None
    if tuple(image.shape[1:]) != (record.height, record.width):
        raise DataError(f"{record.file}: image id {record.image_id} is {image.shape[2]}x{image.shape[1]} "
                        f"but its annotation says {record.width}x{record.height}")
    return image


class ViewDataset(Dataset):
    """Items are (image_index, view_index) pairs; each becomes the model input of that view."""

    def __init__(self, data: DetectionData, pre: Preprocessing, views: ViewSet):
        self.data, self.pre, self.views = data, pre, views

    def __len__(self) -> int:
        return len(self.data.records)

    def sample(self, image_index: int, view_index: int) -> dict:
        record = self.data.records[image_index]
        image, geom = apply_view(read_image(record), self.pre, self.views.flip(view_index))
        return {
            "image": image,
            "boxes": geom.boxes_to_view(torch.from_numpy(record.boxes)),
            "labels": torch.from_numpy(record.labels),
            "image_index": image_index,
            "view_index": view_index,
            "geometry": geom,
        }

    def __getitem__(self, key) -> dict:
        image_index, view_index = key if isinstance(key, tuple) else (key, 0)
        try:
            return self.sample(int(image_index), int(view_index))
        except DataError as e:
            # Returned, not raised: a DataLoader worker would wrap it in a multi-line traceback;
            # `check_batch` raises it in the main process as the one-line error it is.
            return {"error": str(e), "image_index": int(image_index), "view_index": int(view_index)}


def collate(samples: list[dict]) -> list[dict]:
    return samples


def check_batch(batch: list[dict]) -> list[dict]:
    """Raises the DataError of the first sample that could not be made (see ViewDataset)."""
    for s in batch:
        if "error" in s:
            raise DataError(s["error"])
    return batch


class ViewSampler(Sampler):
    """Yields (image_index, view_index): each image once per epoch with one of its views.

    The order and the view of each (image, epoch) depend only on (seed, epoch), so the
    same seed gives the same data order and views, and every rank of a distributed run
    draws the same permutation and takes its own stride of it (as DistributedSampler does).
    """

    def __init__(self, num_images: int, num_views: int, seed: int = 0, shuffle: bool = True,
                 random_view: bool = True, rank: int = 0, world_size: int = 1, drop_last: bool = False):
        self.num_images, self.num_views = num_images, num_views
        self.seed, self.shuffle, self.random_view = seed, shuffle, random_view
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0
        if drop_last:
            self.per_rank = num_images // world_size
        else:
            self.per_rank = math.ceil(num_images / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> list[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.num_images, generator=g) if self.shuffle else torch.arange(self.num_images)
        if self.random_view and self.num_views > 1:
            views = torch.randint(self.num_views, (self.num_images,), generator=g)
        else:
            views = torch.zeros(self.num_images, dtype=torch.long)
        items = [(int(i), int(views[i])) for i in perm]
        total = self.per_rank * self.world_size
        if total > len(items):  # pad by repeating, as DistributedSampler does
            items = items + items[: total - len(items)]
        return items[:total]

    def __iter__(self):
        return iter(self.order()[self.rank::self.world_size])

    def __len__(self) -> int:
        return self.per_rank


__all__ = ["DataError", "DetectionData", "ImageRecord", "ViewDataset", "ViewGeometry", "ViewSampler",
           "collate", "load_dataset", "read_image", "read_toml"]
