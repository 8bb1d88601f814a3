"""The extraction lock: one `extract` job writes a cache at a time.

A job (one process, or rank 0 of a torchrun job on behalf of all its ranks) holds the lock
from before it creates or resumes the cache until it ends, normally or with an error. The
lock is a small JSON object ``LOCK_NAME`` inside the cache's folder or URL prefix, naming its
holder; a second job is refused with a message naming the holder, a stale lock (its holder
gone from this host) is taken over. How, and what is guaranteed on local filesystems and on
object storage: `defeat_cache.locking` (one implementation for every stage's lock).
"""
from __future__ import annotations

from .. import locking
from ..locking import LockHolder
from . import storage
from .errors import CacheError

__all__ = ["LOCK_NAME", "BREAK_NAME", "LockHolder", "ExtractLock", "read_lock_holder", "is_lock_file"]

LOCK_NAME = "extract.lock"
BREAK_NAME = locking.break_name(LOCK_NAME)


def is_lock_file(name: str) -> bool:
    """Whether a name in a cache's folder is the lock's (the lock, its break lock, their
    temporary files)."""
    return locking.is_lock_file(name, LOCK_NAME)


def _files(path, storage_options: dict | None):
    return locking.ObjectFiles(str(path), storage_options) if storage.is_url(path) else locking.LocalFiles(path)


def read_lock_holder(path, storage_options: dict | None = None) -> LockHolder | None:
    """The holder named by the cache's lock, or None when there is no lock."""
    return locking.read_holder(_files(path, storage_options), LOCK_NAME)


class ExtractLock(locking.FolderLock):
    """``with ExtractLock(out): ...`` holds the lock of the cache at `out` (a folder or URL)."""

    name = LOCK_NAME
    error = CacheError
    held_message = ("{path} is being written by another extract ({holder}); wait for it to finish, or if that "
                    "process is gone, delete {lock} and run again")
    broken_message = ("{path}: {break_file} was left by a process that died while taking over a stale extraction "
                      "lock; delete it and run again")

    def __init__(self, path, storage_options: dict | None = None):
        super().__init__(path, _files(path, storage_options))
