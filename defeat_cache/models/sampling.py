"""Random sampling in a training step that depends on the image, not on the batch around it.

torchvision's detectors sample anchors (RPN) and RoIs (box head) with the global RNG, image
after image. The draw an image gets then depends on which images came before it in its
batch, so a global batch split over 2 ranks samples differently from the same batch in one
process, and the gradients differ. Here every image draws from its own generator, seeded
from (run seed, epoch, image, view) and a salt per sampling site, so a step computes the
same thing whatever the world size or the per-rank batch (DDP equals single-process
training), and a resumed run samples exactly as a straight one.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

# One stream per sampling site, so e.g. the RPN's and the box head's draws are independent.
SALTS = {"rpn": 1, "roi": 2, "kd_rois": 3, "random_mask": 4, "sub_negative": 5, "mgd_mask": 6}


def item_seed(seed: int, epoch: int, image_index: int, view_index: int) -> int:
    """A 63-bit seed for one (image, view) in one epoch of a run."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{image_index}/{view_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def image_generator(seed: int, site: str, device: torch.device | str) -> torch.Generator:
    """The generator of one image at one sampling site (on the device its tensors live on)."""
    return torch.Generator(device=device).manual_seed((seed + SALTS[site] * 0x9E3779B97F4A7C15) % 2**63)


class ItemSeededSampler(BalancedPositiveNegativeSampler):
    """torchvision's balanced positive/negative sampler (same counts: a `positive_fraction` of
    `batch_size_per_image`, topped up with negatives), drawing each image's sample from that
    image's generator when `seeds` is set; with `seeds` None it is torchvision's sampler."""

    def __init__(self, batch_size_per_image: int, positive_fraction: float, site: str):
        super().__init__(batch_size_per_image, positive_fraction)
        if site not in SALTS:
            raise ValueError(f"unknown sampling site {site!r}; expected one of {sorted(SALTS)}")
        self.site = site
        self.seeds: list[int] | None = None

    def __call__(self, matched_idxs: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        if self.seeds is None:
            return super().__call__(matched_idxs)
        if len(self.seeds) != len(matched_idxs):
            raise RuntimeError(f"{self.site} sampler: {len(self.seeds)} seeds for {len(matched_idxs)} images")
        pos_masks, neg_masks = [], []
        for matched, seed in zip(matched_idxs, self.seeds):
            g = image_generator(seed, self.site, matched.device)
            positive = torch.nonzero(matched >= 1).flatten()
            negative = torch.nonzero(matched == 0).flatten()
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            pos_pick = positive[torch.randperm(positive.numel(), generator=g, device=matched.device)[:num_pos]]
            neg_pick = negative[torch.randperm(negative.numel(), generator=g, device=matched.device)[:num_neg]]
            pos_mask = torch.zeros_like(matched, dtype=torch.uint8)
            neg_mask = torch.zeros_like(matched, dtype=torch.uint8)
            pos_mask[pos_pick] = 1
            neg_mask[neg_pick] = 1
            pos_masks.append(pos_mask)
            neg_masks.append(neg_mask)
        return pos_masks, neg_masks


def image_generators(seeds: Sequence[int] | None, site: str, device) -> list[torch.Generator] | None:
    """One generator per image at a sampling site, or None without seeds (the global RNG)."""
    return None if seeds is None else [image_generator(s, site, device) for s in seeds]


def _sampler_owners(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module holding `fg_bg_sampler`, site) of a Faster R-CNN; RetinaNet samples nothing."""
    pairs = ((getattr(model, "rpn", None), "rpn"), (getattr(model, "roi_heads", None), "roi"))
    return [(owner, site) for owner, site in pairs if owner is not None and hasattr(owner, "fg_bg_sampler")]


def install_item_seeded_samplers(model: nn.Module) -> None:
    """Replace a Faster R-CNN's RPN and box-head samplers by ItemSeededSamplers with the same settings."""
    for owner, site in _sampler_owners(model):
        old = owner.fg_bg_sampler
        if isinstance(old, BalancedPositiveNegativeSampler) and not isinstance(old, ItemSeededSampler):
            owner.fg_bg_sampler = ItemSeededSampler(old.batch_size_per_image, old.positive_fraction, site)


def samplers_of(model: nn.Module) -> list[ItemSeededSampler]:
    return [o.fg_bg_sampler for o, _ in _sampler_owners(model) if isinstance(o.fg_bg_sampler, ItemSeededSampler)]


@contextmanager
def seeded_sampling(samplers: Sequence[ItemSeededSampler], seeds: Sequence[int] | None) -> Iterator[None]:
    """Within the block, `samplers` draw per image from `seeds` (one per image of the batch)."""
    seeds = list(seeds) if seeds is not None else None
    for s in samplers:
        s.seeds = seeds
    try:
        yield
    finally:
        for s in samplers:
            s.seeds = None


__all__ = ["ItemSeededSampler", "SALTS", "image_generator", "image_generators", "install_item_seeded_samplers",
           "item_seed", "samplers_of", "seeded_sampling"]
