"""The arithmetic of the `compact` codec: a per-level PCA basis and uniformly quantised coefficients.

Transform coding, as JPEG does it with a DCT, but with a basis learnt from the teacher itself.
FPN channels are strongly correlated, so each level's C channels are rotated onto the principal
axes of the teacher's own features: the basis is fitted once per cache, before any shard, on a
fixed sample of items (`BasisFitter`, driven by extract.py), and stored in the cache. The
coefficients are quantised with ONE step per (item, level), `step = q x rms(item, level)` where
rms is that item's own rms of the centred features. One step for every component is the reverse
water-filling rule of rate-distortion theory: equal distortion per component spends the bits
where the variance is, and a component whose variance is below the distortion level quantises
to zeros that the entropy coder stores almost for free. The same rule chooses the rank stored per
level (the components whose fitted variance exceeds the distortion `(q rms)^2 / 12`), so the rank
follows the error target instead of being hard-coded for one model.

Decoding is one matrix product, `x = V_r^T (codes * step) + mean`, on whatever device the codes
are on (the training device, see reader.py `decode_item`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["DEFAULT_STEP", "LevelBasis", "BasisFitter", "fit_basis", "encode_level", "decode_level"]

#: quantisation step in units of the (item, level) rms: 2.0 measured ~28x smaller than fp16 on the
#: quickstart teacher (docs/benchmarks.md, "Compact caches")
DEFAULT_STEP = 2.0
MIN_CELLS_PER_CHANNEL = 4  # below this many fitted cells per channel, a level keeps all components
CODE_MAX = 32767  # int16 codes: a component wider than this many steps gets a step of its own


@dataclass
class LevelBasis:
    """One level's basis. ``components`` [r, C] are orthonormal rows by decreasing variance;
    ``variances`` [C] are the fitted variances of ALL C principal components (explained energy)."""

    mean: torch.Tensor
    components: torch.Tensor
    variances: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.components.shape[0])

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    def explained(self, rank: int | None = None) -> float:
        """Fraction of the centred energy the first `rank` components hold (default: the stored rank)."""
        v = self.variances.double()
        return float(v[: self.rank if rank is None else rank].sum() / v.sum().clamp_min(1e-300))

    def to(self, device) -> "LevelBasis":
        return LevelBasis(self.mean.to(device), self.components.to(device), self.variances)

    # stored as one float32 array [2 + r, C]: row 0 the mean, row 1 the variances, then the components
    def to_array(self) -> np.ndarray:
        return np.concatenate([self.mean[None], self.variances[None], self.components]).astype(np.float32)

    @classmethod
    def from_array(cls, a: np.ndarray) -> "LevelBasis":
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        return cls(mean=t[0].clone(), variances=t[1].clone(), components=t[2:].clone())


class BasisFitter:
    """Streaming mean and covariance of one level's channels over the cells of many items."""

    def __init__(self, channels: int):
        self.channels = channels
        self.cells = 0
        self._sum = torch.zeros(channels, dtype=torch.float64)
        self._outer = torch.zeros(channels, channels, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        """x: [C, h, w] features of one item at its own extent."""
        f = x.detach().reshape(self.channels, -1).to("cpu", torch.float64)
        self.cells += f.shape[1]
        self._sum += f.sum(1)
        self._outer += f @ f.T

    def fit(self, step: float) -> LevelBasis:
        if self.cells < 2:
            raise ValueError("a basis needs features of at least two cells")
        mean = self._sum / self.cells
        cov = self._outer / self.cells - torch.outer(mean, mean)
        var, vec = torch.linalg.eigh(cov)  # ascending order
        var, vec = var.flip(0).clamp_min(0.0), vec.flip(1)
        rms = math.sqrt(float(var.sum()) / self.channels)
        distortion = (step * rms) ** 2 / 12  # uniform quantisation noise of one step
        rank = max(1, int((var > distortion).sum()))
        if self.cells < MIN_CELLS_PER_CHANNEL * self.channels:
            # too few cells to estimate the spectrum (a coarse level of few, small images): the
            # sample's covariance is rank-deficient and other items have energy outside it, so
            # keep every component (still quantised with the common step)
            rank = self.channels
        return LevelBasis(mean.float(), vec.T[:rank].float().contiguous(), var.float())


def fit_basis(maps, step: float) -> LevelBasis:
    """The basis of one level over several [C, h, w] feature maps (tensors or arrays)."""
    maps = [torch.as_tensor(m) for m in maps]
    fitter = BasisFitter(maps[0].shape[0])
    for m in maps:
        fitter.add(m)
    return fitter.fit(step)


def encode_level(x: torch.Tensor, basis: LevelBasis, step: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x: float [C, h, w] (any device) -> (int16 codes [r, h, w], float32 steps [r]), on x's device."""
    C, h, w = x.shape
    xc = x.reshape(C, -1).float() - basis.mean.to(x.device)[:, None]
    coef = basis.components.to(x.device) @ xc
    base = max(step * float(xc.pow(2).mean().sqrt()), 1e-30)
    steps = torch.clamp(coef.abs().amax(1) / CODE_MAX, min=base)  # never clipped
    codes = torch.round(coef / steps[:, None]).clamp_(-CODE_MAX, CODE_MAX).to(torch.int16)
    return codes.reshape(-1, h, w), steps


def decode_level(codes: torch.Tensor, steps: torch.Tensor, basis: LevelBasis) -> torch.Tensor:
    """int16 codes [..., r, h, w] with steps [..., r] -> float32 [..., C, h, w] on the codes' device."""
    *lead, r, h, w = codes.shape
    coef = codes.reshape(*lead, r, h * w).float() * steps.to(codes.device).float()[..., None]
    x = torch.matmul(basis.components[:r].T.to(codes.device), coef) + basis.mean.to(codes.device)[:, None]
    return x.reshape(*lead, basis.channels, h, w)
