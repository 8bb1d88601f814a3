"""Folder locks: one job at a time writes a folder (a cache, a training run).

A job (one process, or rank 0 of a torchrun job on behalf of all its ranks) holds the lock
from before it creates, clears or writes anything in the folder until it ends, normally or
with an error. The lock is a small JSON object (`FolderLock.name`: ``extract.lock`` for a
cache, ``train.lock`` for a run) inside the folder or URL prefix, naming its holder: host,
pid, the process's start time and a random token. A second job finds it and is refused with
a message naming the holder. A lock whose holder is gone (same host, pid no longer alive or
reused by another process) is stale and is taken over; a holder on another host cannot be
checked from here, so its lock is only ever removed by the user.

What is guaranteed (docs/design.md, "The extraction lock"):
- local and shared POSIX filesystems (NFS included): taking the lock is atomic. The lock file
  is written whole under a unique temporary name and published with ``os.link``, which fails
  if the name exists (the NFS-safe form of O_CREAT|O_EXCL; a reader never sees a half-written
  lock);
- object storage (`ObjectFiles`): the lock object is written with a create-if-absent request
  (fsspec ``mode="create"``: on AWS S3 a conditional PUT, If-None-Match: *) and read back.
  Stores without conditional writes (and S3-compatible servers that ignore the header) only
  get the read-back check: two jobs starting within the same moment could both pass it (best
  effort).

The stages' locks are subclasses that set the lock's name, the error class and the words of
their refusals: `defeat_cache.cache.lock.ExtractLock`, `defeat_cache.engine.run_files.RunLock`.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

from .errors import UserError

__all__ = ["FolderLock", "LocalFiles", "LockHolder", "ObjectFiles", "break_name", "is_lock_file", "read_holder"]


def break_name(name: str) -> str:
    """The break lock of lock `name`. Taking over a stale lock is "check it is still the stale
    one, then delete it"; two jobs doing that at once could each delete the other's fresh lock.
    The job that holds this second, short-lived lock is the only one allowed to delete a stale
    lock `name`."""
    return f"{name}.break"


def is_lock_file(name: str, lock_name: str) -> bool:
    """Whether `name` (in a locked folder) is one of lock `lock_name`'s files: the lock, its
    break lock, their temporary files."""
    return name in (lock_name, break_name(lock_name)) or (name.startswith(f".{lock_name}") and name.endswith(".tmp"))


def _process_start(pid: int) -> str | None:
    """The kernel's start time of a process (Linux: /proc/PID/stat field 22), to tell a
    reused pid from the process that wrote a lock; None where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


@dataclass(frozen=True)
class LockHolder:
    host: str
    pid: int
    started: str
    token: str
    process_start: str | None = None

    @classmethod
    def me(cls) -> "LockHolder":
        pid = os.getpid()
        return cls(host=socket.gethostname(), pid=pid,
                   started=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                   token=uuid.uuid4().hex, process_start=_process_start(pid))

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "LockHolder | None":
        try:
            d = json.loads(raw.decode())
            return cls(host=str(d["host"]), pid=int(d["pid"]), started=str(d["started"]), token=str(d["token"]),
                       process_start=d.get("process_start"))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None  # unreadable: treated as held (see FolderLock.acquire)

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}"

    def is_stale(self) -> bool:
        """Whether the holder is certainly gone: on this host, and its pid is not alive or now
        belongs to a process started at another time. A holder elsewhere is never stale here."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        now = _process_start(self.pid)
        return self.process_start is not None and now is not None and now != self.process_start


class LocalFiles:
    """Lock files in a local folder (created with the first lock file)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def where(self, name: str) -> str:
        return str(self.root / name)

    def create(self, name: str, data: bytes) -> bool:
        """Atomically create `name` holding `data`; False if it exists."""
        tmp = self.root / f".{name}.{uuid.uuid4().hex}.tmp"
        for attempt in range(3):
            self.root.mkdir(parents=True, exist_ok=True)
            try:
                tmp.write_bytes(data)
                break
            except FileNotFoundError:  # its empty folder was removed just then (a run lock's release): again
                if attempt == 2:
                    raise
        try:
            os.link(tmp, self.root / name)  # fails if the name exists: the atomic step
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def read(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)


class ObjectFiles:
    """Lock objects under an fsspec URL prefix."""

    def __init__(self, url: str, storage_options: dict | None):
        import fsspec
        self.fs, self.root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.url = url.rstrip("/")

    def where(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _key(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def create(self, name: str, data: bytes) -> bool:
        key = self._key(name)
        try:
            self.fs.pipe_file(key, data, mode="create")  # S3: a conditional PUT (If-None-Match: *)
        except FileExistsError:
            return False
        # Read back: a store that ignored the condition lets the last writer win; whoever
        # reads another's bytes here has lost.
        return self.read(name) == data

    def read(self, name: str) -> bytes | None:
        key = self._key(name)
        self.fs.invalidate_cache(key)
        try:
            return self.fs.cat_file(key)
        except FileNotFoundError:
            return None

    def delete(self, name: str) -> None:
        try:
            self.fs.rm_file(self._key(name))
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(self._key(name))


def read_holder(files: LocalFiles | ObjectFiles, name: str) -> LockHolder | None:
    """The holder named by lock `name` in `files`, or None when there is no lock (an unreadable
    lock names an unknown holder)."""
    raw = files.read(name)
    if raw is None:
        return None
    return LockHolder.from_bytes(raw) or LockHolder(host="?", pid=0, started="?", token="")


class FolderLock:
    """``with SomeLock(...): ...`` holds lock `name` of the folder at `path` (see the module doc).

    A subclass sets `name`, the `error` its refusals raise, and their words: `held_message`
    (formatted with `path`, `holder`: who holds it, `lock`: where the lock file is) and
    `broken_message` (`path`, `break_file`: a break lock left by a process that died while
    taking over a stale lock)."""

    name: ClassVar[str]
    error: ClassVar[type[Exception]] = UserError
    held_message: ClassVar[str]
    broken_message: ClassVar[str]
    #: how long a job waits for another one's takeover of a stale lock (it takes milliseconds)
    BREAK_WAIT_S = 2.0

    def __init__(self, path, files: LocalFiles | ObjectFiles):
        self.path = path
        self.files = files
        self.me = LockHolder.me()
        self.held = False
        #: the stale lock's holder this job took the lock over from (None: it was free)
        self.took_over: LockHolder | None = None

    def acquire(self) -> None:
        deadline = time.monotonic() + self.BREAK_WAIT_S
        while True:
            if self.files.create(self.name, self.me.to_bytes()):
                self.held = True
                return
            raw = self.files.read(self.name)
            if raw is None:
                continue  # released between our attempt and the read: try again
            holder = LockHolder.from_bytes(raw)
            if holder is None or not holder.is_stale():
                # a lock we cannot parse may be one being written by a store without atomic
                # writes: it counts as held
                who = holder.describe() if holder else "an unreadable lock"
                raise self.error(self.held_message.format(path=self.path, holder=who,
                                                          lock=self.files.where(self.name)))
            if self._break(raw):
                self.took_over = holder
            elif time.monotonic() > deadline:
                raise self.error(self.broken_message.format(path=self.path,
                                                            break_file=self.files.where(break_name(self.name))))

    def _break(self, stale: bytes) -> bool:
        """Delete the stale lock `stale` if it is still the one there; False if another job is
        taking it over (the caller retries: it then finds that job's lock, or none)."""
        breaker = break_name(self.name)
        if not self.files.create(breaker, self.me.to_bytes()):
            time.sleep(0.05)
            return False
        try:
            # Holding the break lock, no other job deletes the lock; the lock we judged stale is
            # deleted only if it is still there byte for byte, never a fresh one taken meanwhile.
            if self.files.read(self.name) == stale:
                self.files.delete(self.name)
        finally:
            self.files.delete(breaker)
        return True

    def release(self) -> None:
        """Delete the lock if it is still ours (never another job's)."""
        if self.held:
            self.held = False
            if self.files.read(self.name) == self.me.to_bytes():
                self.files.delete(self.name)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
