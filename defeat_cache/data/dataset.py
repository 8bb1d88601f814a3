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
        if "annotations" not in section:
            raise DataError(f"{toml_path}: [{split}] needs 'annotations' (path to a COCO json)")
        images = section.get("images")
        return load_coco(base / section["annotations"], base / images if images else None, name, split)
    if fmt == "voc":
        roots = section.get("root", spec.get("root"))
        if roots is None or "image_set" not in section:
            raise DataError(f"{toml_path}: [{split}] needs 'root' (VOC20xx folder or a list) and 'image_set'")
        roots = [roots] if isinstance(roots, str) else list(roots)
        classes = tuple(spec.get("classes", VOC_CLASSES))
        return load_voc([base / r for r in roots], section["image_set"], name, split, classes)
    raise DataError(f"{toml_path}: format = {fmt!r} is not supported (use \"coco\" or \"voc\")")


def read_image(record: ImageRecord) -> torch.Tensor:
    """Decodes one image to uint8 RGB [3, H, W]; a clear error names the image if it cannot."""
    try:
        with Image.open(record.file) as im:
            image = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
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
