"""`defeat-cache predict`: run a detector from any checkpoint form over image files.

Writes COCO results JSON ([{image_id, category_id, bbox: [x, y, w, h], score, file_name}]) with
the category ids the checkpoint's dataset uses. Images are read as they are (no annotations):
an image's id is the dataset's id of that file when `--data` lists it, else its file name's number
when the names are distinct numbers (COCO's 000000397133.jpg -> 397133), else its position in
the input order (1, 2, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import UserError
from ..models.detector import load_detector
from ..progress import progress
from .evaluate import write_json_atomic

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class PredictOptions:
    checkpoint: str
    inputs: list[str]  # image files and folders (their images, sorted, not recursive)
    out: str  # detections JSON
    draw: str | None = None  # folder for drawn images
    model: str | None = None  # where the checkpoint does not say it
    data: str | None = None  # dataset TOML: classes where the checkpoint does not say them, image ids
    split: str = "val"  # the split of `data` whose image ids the files get
    device: str = "cpu"
    score_threshold: float = 0.05  # detections kept in the JSON
    draw_threshold: float = 0.3  # detections drawn


def image_files(inputs: list[str]) -> list[Path]:
    files = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise UserError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: no such image file or folder")
    return files


def read_rgb(path: Path) -> torch.Tensor:
    """uint8 RGB [3, H, W]."""
    try:
        with Image.open(path) as im:
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise UserError(f"{path}: cannot read this image ({e})") from None


def image_ids(files: list[Path], data=None) -> list[int]:
    """The dataset's ids of the files (by path) when `data` lists them all, else the file-name
    numbers when every name is a distinct number, else 1..N in input order."""
    if data is not None:
        by_path = {r.file.resolve(): r.image_id for r in data.records}
        if all(f.resolve() in by_path for f in files):
            return [by_path[f.resolve()] for f in files]
    stems = [f.stem for f in files]
    if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return [int(s) for s in stems]
    return list(range(1, len(files) + 1))


@torch.no_grad()
def predict_files(opts: PredictOptions) -> dict:
    """Detections of every image into `opts.out` (and drawings into `opts.draw`); returns a summary."""
    files = image_files(opts.inputs)
    device = torch.device(opts.device)
    data = None
    if opts.data:
        from ..data.dataset import load_dataset
        data = load_dataset(opts.data, opts.split)
    model = load_detector(opts.checkpoint, opts.model, data, device)
    info = model.info
    names = {c["label"]: c["name"] for c in info.classes()}
    cat_ids = {c["label"]: c["id"] for c in info.classes()}
    dets = []
    bar = progress(len(files), "predict")
    for path, image_id in zip(files, image_ids(files, data)):
        image = read_rgb(path)
        out = model([image.to(device)])[0]
        keep = out["scores"] >= opts.score_threshold
        boxes, scores, labels = out["boxes"][keep].cpu(), out["scores"][keep].cpu(), out["labels"][keep].cpu()
        mine = [{"image_id": image_id, "category_id": cat_ids[int(lab)], "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                 "score": float(s), "file_name": path.name}
                for b, s, lab in zip(boxes.tolist(), scores.tolist(), labels.tolist())]
        dets += mine
        if opts.draw:
            from .draw import draw_detections
            shown = [(b, names[int(lab)], float(s)) for b, s, lab in zip(boxes.tolist(), scores.tolist(), labels.tolist())
                     if s >= opts.draw_threshold]
            draw_detections(image, shown, Path(opts.draw) / f"{path.stem}.png")
        bar.update(1)
    bar.close()
    write_json_atomic(opts.out, dets)
    return {"images": len(files), "detections": len(dets), "out": str(opts.out), "draw": opts.draw,
            "model": info.spec.name, "checkpoint_form": info.form}


__all__ = ["IMAGE_SUFFIXES", "PredictOptions", "image_files", "image_ids", "predict_files", "read_rgb"]
