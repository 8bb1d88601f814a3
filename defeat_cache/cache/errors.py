"""The cache's error types: what can be wrong with a cache, its path or what is written to it.

All are `UserError`s (the CLI prints them as one `Error:` line): a cache made for another
run, an unfinished one, a path that holds something else, a teacher output that cannot be
stored. Bugs in the cache code stay ordinary exceptions.
"""
from __future__ import annotations

from ..errors import UserError

__all__ = ["CacheError", "CacheMismatchError", "NonFiniteError", "IncompleteCacheError", "NotACacheError", "DAMAGED"]

#: what every message about a damaged cache tells the user to do: nothing of it can be trusted,
#: and only the user may delete it (we never delete what might not be ours)
DAMAGED = "the cache is damaged or was edited: delete it and run extract again"


class CacheError(UserError):
    """Base class of cache errors."""


class CacheMismatchError(CacheError):
    """The cache at a path was made with different provenance/layout than this run."""


class NonFiniteError(CacheError):
    """A tensor to be cached holds NaN/Inf (or overflows the codec's stored dtype).

    `image_index`/`view_index` say which item, so callers can name the image to the user."""

    def __init__(self, message: str, image_index: int | None = None, view_index: int | None = None):
        super().__init__(message)
        self.image_index, self.view_index = image_index, view_index


class IncompleteCacheError(CacheError):
    """The cache (or the requested item) is not completely written."""


class NotACacheError(CacheError):
    """The path holds no defeat-cache cache."""
