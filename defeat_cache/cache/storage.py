"""Where a cache lives and how zarr reaches it: local folders or fsspec URLs, storage
options, opening the group, concurrent array reads/writes, and zarr's thread pool.
"""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any, Sequence

import zarr
from zarr.core.sync import sync as _zarr_sync

from .errors import DAMAGED, CacheError

__all__ = ["configure_zarr_threads", "is_url", "parse_storage_options", "open_group",
           "create_group", "delete_members", "list_names", "local_root", "get_many", "set_many", "exists", "exists_many", "shard_key"]

_SECRET_WORDS = ("key", "secret", "token", "password", "session", "credential")


def configure_zarr_threads(max_workers: int | None = None) -> None:
    """Cap zarr's per-process decode/IO thread pool.

    zarr sizes its pool from os.cpu_count() in *every* process; with several DataLoader
    workers per rank and several ranks per node that is hundreds of threads fighting over
    the same cores (and GIL-holding Python in each worker).  One item is only a handful of
    chunks, so a few threads per process already overlap IO with decode.  Only effective
    before zarr's first call in a process (zarr re-creates the pool after fork, so calling
    this in a DataLoader worker before its first read works).  An explicit user setting
    (zarr.config or DEFEAT_CACHE_ZARR_THREADS) wins.
    """
    if max_workers is None:
        if zarr.config.get("threading.max_workers", None) is not None:
            return
        env = os.environ.get("DEFEAT_CACHE_ZARR_THREADS")
        max_workers = int(env) if env else max(1, min(4, os.cpu_count() or 1))
    zarr.config.set({"threading.max_workers": int(max_workers)})


def is_url(path) -> bool:
    """True for fsspec URLs (s3://, gs://, memory://...); local folders are plain paths."""
    return "://" in str(path)


def parse_storage_options(pairs: Sequence[str]) -> dict:
    """``["endpoint_url=http://host:9000", "client_kwargs.region_name=eu-west-1", "anon=true"]``
    -> fsspec storage options. true/false and numbers become booleans and numbers, except
    for keys that name a secret (key, secret, token, ...), which stay strings; dots in a key
    make nested dicts. Errors name the key, never the value (it may be a secret)."""
    options: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CacheError(f"--storage-option {key or '?'}: expected KEY=VALUE, "
                             "e.g. endpoint_url=http://127.0.0.1:9000")
        *parents, leaf = key.split(".")
        value: Any = raw
        if not any(w in leaf.lower() for w in _SECRET_WORDS):
            if raw.lower() in ("true", "false"):
                value = raw.lower() == "true"
            else:
                for number in (int, float):
                    try:
                        value = number(raw)
                        break
                    except ValueError:
                        pass
        node = options
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CacheError(f"--storage-option {key}: {part!r} is already given a value")
        if isinstance(node.get(leaf), dict):
            raise CacheError(f"--storage-option {key}: already given as a group of options ({key}.*)")
        node[leaf] = value
    return options


def _zarr_call(path, storage_options: dict | None, fn):
    """fn() (a zarr call on `path`) with the user's setup problems turned into CacheErrors;
    a missing group stays FileNotFoundError (callers decide what that means)."""
    if storage_options and not is_url(path):
        raise CacheError(f"{path}: storage options apply to URLs (s3://...), not to local paths")
    try:
        return fn()
    except (FileNotFoundError, CacheError):
        raise
    except json.JSONDecodeError as e:  # a truncated or overwritten zarr.json
        raise CacheError(f"{path}: its zarr.json (the group metadata that holds a cache's manifest) is not valid "
                         f"JSON ({e}); {DAMAGED}") from None
    except ImportError as e:  # fsspec names the package a protocol needs (s3fs, gcsfs, ...)
        raise CacheError(f"{path}: {e}; install it in this environment "
                         "(for s3:// URLs: pip install 'defeat-cache[s3]')") from None
    except Exception as e:
        if not is_url(path):
            raise
        # Object-store client errors (unreachable endpoint, missing credentials, denied access)
        # come from whichever fsspec backend; they are the user's setup, not a bug of ours.
        raise CacheError(f"{path}: cannot open ({type(e).__name__}: {e}); check the URL, the credentials "
                         "(e.g. AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and the endpoint "
                         "(AWS_ENDPOINT_URL or --storage-option endpoint_url=...)") from None


def _store_arg(path):
    return str(path) if isinstance(path, Path) else path


def open_group(path, mode: str, storage_options: dict | None):
    """zarr.open_group (format 3) with the user's setup problems turned into CacheErrors;
    a missing group stays FileNotFoundError (callers decide what that means)."""
    kw = {"storage_options": storage_options} if storage_options else {}
    return _zarr_call(path, storage_options,
                      lambda: zarr.open_group(_store_arg(path), mode=mode, zarr_format=3, **kw))


def create_group(path, attributes: dict, storage_options: dict | None):
    """A new zarr group (format 3) whose zarr.json holds `attributes` from its first write;
    never overwrites anything (zarr refuses if a group or array exists there)."""
    kw = {"storage_options": storage_options} if storage_options else {}
    return _zarr_call(path, storage_options, lambda: zarr.create_group(
        _store_arg(path), zarr_format=3, overwrite=False, attributes=attributes, **kw))


def delete_members(group, names) -> None:
    """Delete everything under each of `names` in the group (members and any stray chunks);
    only for names the caller itself created."""
    for name in names:
        _zarr_sync(group.store.delete_dir(f"{group.path}/{name}" if group.path else name))


def list_names(path, storage_options: dict | None) -> list[str] | None:
    """The names directly under a local folder or URL prefix; None when nothing is there.
    A path that is a file (or an object) is a one-line CacheError."""
    if not is_url(path):
        p = Path(path)
        if not p.exists():
            return None
        if not p.is_dir():
            raise CacheError(f"--out {path} is an existing file, not a cache folder; give the path of a new folder")
        return sorted(x.name for x in p.iterdir())
    import fsspec
    fs, root = fsspec.core.url_to_fs(str(path), **(storage_options or {}))
    fs.invalidate_cache(root)  # fsspec instances are shared with zarr's store: no stale listing
    try:
        if fs.isfile(root):
            raise CacheError(f"--out {path} is an existing object, not a cache prefix; give a new prefix")
        return sorted(x.rstrip("/").rsplit("/", 1)[-1] for x in fs.ls(root, detail=False)) or None
    except FileNotFoundError:
        return None


def local_root(group) -> Path | None:
    """The group's folder for a local store; None for URLs (and in-memory stores)."""
    store = group.store
    if isinstance(store, zarr.storage.LocalStore):
        return Path(store.root) / group.path if group.path else Path(store.root)
    return None


async def _gather_get(reqs):
    return await asyncio.gather(*(arr.async_array.getitem(sel) for arr, sel in reqs))


async def _gather_set(reqs):
    await asyncio.gather(*(arr.async_array.setitem(sel, val) for arr, sel, val in reqs))


def get_many(reqs: list) -> list:
    """Read several (array, selection) pairs in one zarr event-loop round trip."""
    return list(_zarr_sync(_gather_get(reqs)))


def set_many(reqs: list) -> None:
    """Write several (array, selection, value) triples in one zarr event-loop round trip."""
    _zarr_sync(_gather_set(reqs))


def exists(store, key: str) -> bool:
    """Whether the store holds an object under ``key`` (e.g. one shard file)."""
    return bool(_zarr_sync(store.exists(key)))


async def _gather_exists(store, keys):
    return await asyncio.gather(*(store.exists(k) for k in keys))


def exists_many(store, keys: list[str]) -> list[bool]:
    """`exists` for several keys in one event-loop round trip."""
    return [bool(x) for x in _zarr_sync(_gather_exists(store, keys))]


def shard_key(arr, shard: int) -> str:
    """The store key of one shard file of a per-item array (sharded along its first axis)."""
    return f"{arr.path}/{arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))}"
