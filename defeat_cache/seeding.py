"""Every initialisation of a run draws from its own generator, seeded by the run seed and a name.

What a user sees must not depend on the order in which modules are built: an online teacher
built before the adaptation layers (or a new KD module added to the distiller) must not shift
the draws of anything else. So each model-building step runs inside `seeded_init(seed, name)`,
which seeds torch's CPU generator from (seed, name) alone and restores the global generator
afterwards; modules are built on the CPU, then moved to their device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def derived_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one named use of a run seed (stable across processes and platforms)."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextmanager
def seeded_init(seed: int, name: str) -> Iterator[None]:
    """Inside: torch's CPU generator is seeded with derived_seed(seed, name); after: as before."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(seed, name))
        yield


__all__ = ["derived_seed", "seeded_init"]
