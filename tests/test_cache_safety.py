"""Cache store safety: the extraction lock, what `--out` may hold, checks before anything is
written, damaged caches (missing shard files and chunks, arrays unlike their manifest, broken
manifests and markers), a cache still being written, and a full disk. Each user mistake or
damage ends in one line naming what is wrong and what to do; nothing we did not create is
ever deleted.

One small extraction (4 images x 2 views, 3 items a shard: 3 shards, fp16) is the reference;
the damage tests work on copies of it.
"""
from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import zarr
from click.testing import CliRunner

from defeat_cache.cache import CacheError, NotACacheError, TeacherCache
from defeat_cache.cache import extract as extract_mod
from defeat_cache.cache import writer as writer_mod
from defeat_cache.cache.extract import extract
from defeat_cache.cli import main as cli
from defeat_cache.errors import UserError

from builders import cli_extract_argv, random_detector_checkpoint, shapes_dataset, tiny_extract_options
from checks import assert_same_caches

ITEMS_PER_SHARD = 3  # 8 items -> shards of 3, 3, 2


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return shapes_dataset(tmp_path_factory.mktemp("safety_shapes"), num_train=4, num_val=2)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_model_toml, data) -> Path:
    return random_detector_checkpoint(tmp_path_factory.mktemp("safety_teacher") / "t.pt", tiny_model_toml, data)


@pytest.fixture(scope="module")
def opts(tiny_model_toml, ckpt, data):
    def make(out, **overrides):
        return tiny_extract_options(tiny_model_toml, ckpt, data, out,
                                    **{"codec": "fp16", "items_per_shard": ITEMS_PER_SHARD, **overrides})
    return make


@pytest.fixture(scope="module")
def reference(tmp_path_factory, opts) -> Path:
    out = tmp_path_factory.mktemp("safety_ref") / "ref.zarr"
    assert extract(opts(out))["complete"]
    return out


def copy_of(reference: Path, tmp_path: Path, complete: bool = True) -> Path:
    """A copy of the reference cache; complete=False: as a killed extraction leaves it (shard 2 not done)."""
    path = tmp_path / "c.zarr"
    shutil.copytree(reference, path)
    if not complete:
        group = zarr.open_group(str(path), mode="r+")
        group["shard_done"][2] = False
        manifest = dict(group.attrs["defeat_cache"])
        manifest["complete"] = False
        group.attrs["defeat_cache"] = manifest
    return path


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def edit_manifest(path: Path, change) -> None:
    """Rewrites the cache's zarr.json with change(manifest) as its manifest."""
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["defeat_cache"] = change(meta["attributes"]["defeat_cache"])
    (path / "zarr.json").write_text(json.dumps(meta))


def run(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(res, *words):
    """The command failed with one `Error:` line, its last (progress and log lines may come before)."""
    out = res.output
    assert res.exit_code == 1, out
    lines = out.strip().splitlines()
    assert "Traceback" not in out and lines[-1].startswith("Error: "), out
    assert [l for l in lines if "Error" in l] == lines[-1:], out
    for w in words:
        assert w in lines[-1], (w, out)
    return lines[-1]


def one_line(e: pytest.ExceptionInfo, *words) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


# ------------------------------------------------------------------------------------ the lock
def _hold_lock(out: str, ready, go, release: bool) -> None:
    """A forked process: takes the lock of `out`, says so, waits; exits with or without releasing it."""
    from defeat_cache.cache.lock import ExtractLock
    lock = ExtractLock(out)
    lock.acquire()
    ready.set()
    go.wait(120)
    if release:
        lock.release()
    os._exit(0)


def _holder(out) -> tuple:
    ctx = mp.get_context("fork")
    ready, go = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(str(out), ready, go, False))
    p.start()
    assert ready.wait(60)
    return p, go


def test_a_second_extract_is_refused_naming_the_holder_and_a_stale_lock_is_taken_over(
        tmp_path, tiny_model_toml, ckpt, data):
    out = tmp_path / "c.zarr"
    argv = ["-m", "defeat_cache", *cli_extract_argv(tiny_model_toml, ckpt, data, out)]
    p, go = _holder(out)
    try:
        res = run(argv[2:])
        assert_one_line_error(res, "being written by another extract", f"host {socket.gethostname()}",
                              f"pid {p.pid}", "started", "extract.lock")
        assert sorted(x.name for x in out.iterdir()) == ["extract.lock"]  # nothing else written
    finally:
        go.set()
        p.join(30)
    # the holder died without releasing: its lock is stale and taken over
    assert (out / "extract.lock").exists()
    res = run(argv[2:])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["complete"]
    assert not (out / "extract.lock").exists()  # released on a normal exit
    assert TeacherCache(str(out)).verify().ok


def _race(out: str, start, attempted, results) -> None:
    from defeat_cache.cache.lock import ExtractLock
    lock = ExtractLock(out)
    start.wait(30)
    try:
        lock.acquire()
        results.put(f"won {os.getpid()}")
    except CacheError as e:
        results.put(f"refused {e}")
    results.close()
    results.join_thread()  # flushed before os._exit
    attempted.wait(30)  # everyone has tried before the winner lets go
    lock.release()
    os._exit(0)


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "over_a_stale_lock"])
def test_processes_starting_at_once_get_the_lock_exactly_once(tmp_path, stale):
    from defeat_cache.cache.lock import LOCK_NAME, LockHolder
    out = tmp_path / "c.zarr"
    if stale:  # the lock of a process that has exited
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        out.mkdir()
        (out / LOCK_NAME).write_bytes(LockHolder(socket.gethostname(), dead.pid, "2026-01-01T00:00:00+00:00",
                                                 "f" * 32).to_bytes())
    ctx, n = mp.get_context("fork"), 4
    start, attempted, results = ctx.Barrier(n), ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(out), start, attempted, results)) for _ in range(n)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in range(n)]
    for p in procs:
        p.join(30)
    winners = [g for g in got if g.startswith("won")]
    assert len(winners) == 1, got
    pid = winners[0].split()[1]
    assert all(f"pid {pid}," in g for g in got if g.startswith("refused")), got
    assert sorted(x.name for x in out.iterdir()) == []  # released, no break file or temporary left


def test_the_lock_is_released_when_extraction_fails(tmp_path, monkeypatch, opts):
    out = tmp_path / "c.zarr"

    def broken_teacher(*a, **kw):
        raise RuntimeError("teacher exploded")

    monkeypatch.setattr(extract_mod, "teacher_outputs", broken_teacher)
    with pytest.raises(RuntimeError, match="teacher exploded"):
        extract(opts(out))
    assert not (out / "extract.lock").exists()


# ------------------------------------------------------------------------------------ training on a cache being written
def test_training_on_a_cache_being_written_is_refused_with_the_shard_count(tmp_path, reference, tiny_student_toml,
                                                                           data):
    path = copy_of(reference, tmp_path, complete=False)
    argv = ["train", "--student", tiny_student_toml, "--data", data, "--out", tmp_path / "run", "--cache", path,
            "--max-iters", "1", "--batch-size", "2", "--workers", "0"]
    assert_one_line_error(run(argv), "incomplete: 2 of 3 shards done", "run the same extract command again")
    p, go = _holder(path)
    try:
        assert_one_line_error(run(argv), "still being written by extract", f"pid {p.pid}", "2 of 3 shards done")
        res = run(["inspect", path])
        assert res.exit_code == 0 and f"extract.lock: host {socket.gethostname()}, pid {p.pid}" in res.output, res.output
    finally:
        go.set()
        p.join(30)
    assert not (tmp_path / "run" / "final.pt").exists()


# ------------------------------------------------------------------------------------ what --out holds
def _foreign_group(path: Path, kind: str) -> None:
    group = zarr.create_group(str(path), zarr_format=3)
    if kind == "group_with_our_names":  # arrays named like ours, written by someone else
        group.create_array("meta", shape=(4, 2), dtype="int64")[:] = 7
        group.create_array("rois", shape=(4, 5), dtype="float32")[:] = 1.5
        group.create_array("features/p2", shape=(4, 3), dtype="float32")[:] = 2.0
    if kind != "empty_group":
        (path / "notes.txt").write_text("someone's results")


@pytest.mark.parametrize("kind", ["empty_group", "empty_group_and_files", "group_with_our_names"])
def test_extract_never_deletes_a_zarr_group_it_did_not_create(tmp_path, opts, kind):
    out = tmp_path / "theirs.zarr"
    _foreign_group(out, kind)
    before = snapshot(out)
    with pytest.raises(NotACacheError) as e:
        extract(opts(out))
    one_line(e, str(out), "did not create", "new --out")
    assert snapshot(out) == before


def test_extract_refuses_a_folder_of_other_files_and_an_existing_file(tmp_path, tiny_model_toml, ckpt, data):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "a.txt").write_text("a")
    assert_one_line_error(run(cli_extract_argv(tiny_model_toml, ckpt, data, folder)), "not empty", "a.txt")
    assert snapshot(folder) == {"a.txt": b"a"}
    file = tmp_path / "cache.zarr"
    file.write_text("a file")
    assert_one_line_error(run(cli_extract_argv(tiny_model_toml, ckpt, data, file)), "is an existing file")
    assert file.read_text() == "a file"


class SimulatedKill(RuntimeError):
    pass


def test_an_interrupted_creation_is_marked_ours_and_cleared_by_the_next_run(tmp_path, monkeypatch, opts, reference):
    out = tmp_path / "c.zarr"
    real = writer_mod._create_arrays

    def dying(group, layout, bases=None):
        group.create_array("meta", shape=(3,), dtype="int64")[:] = 5  # some arrays exist, then the kill
        raise SimulatedKill("killed while creating the arrays")

    monkeypatch.setattr(writer_mod, "_create_arrays", dying)
    with pytest.raises(SimulatedKill):
        extract(opts(out))
    attrs = zarr.open_group(str(out), mode="r").attrs.asdict()
    assert "defeat_cache_creating" in attrs and "defeat_cache" not in attrs  # the marker came first
    monkeypatch.setattr(writer_mod, "_create_arrays", real)
    # someone else's file in it: not ours to delete
    (out / "notes.txt").write_text("x")
    with pytest.raises(NotACacheError) as e:
        extract(opts(out))
    one_line(e, "interrupted defeat-cache creation", "notes.txt")
    (out / "notes.txt").unlink()
    assert extract(opts(out))["complete"]
    assert "defeat_cache_creating" not in zarr.open_group(str(out), mode="r").attrs
    assert_same_caches(zarr.open_group(str(out), mode="r"), zarr.open_group(str(reference), mode="r"))


def test_a_checkpoint_that_does_not_load_fails_before_out_is_created(tmp_path, tiny_model_toml, tiny_retina_toml,
                                                                     ckpt, data):
    text = tmp_path / "notes.pt"
    text.write_text("this is not a checkpoint\n")
    retina = random_detector_checkpoint(tmp_path / "retina.pt", tiny_retina_toml, data)
    out = tmp_path / "c.zarr"
    assert_one_line_error(run(cli_extract_argv(tiny_model_toml, text, data, out)), "not a readable PyTorch checkpoint")
    assert not out.exists()
    assert_one_line_error(run(cli_extract_argv(tiny_model_toml, retina, data, out)), "does not fit this model")
    assert not out.exists()
    res = run(cli_extract_argv(tiny_model_toml, ckpt, data, out))  # the corrected run
    assert res.exit_code == 0, res.output


# ------------------------------------------------------------------------------------ damaged caches
def _shard_file(path: Path, array: str, shard: int) -> Path:
    arr = zarr.open_array(str(path / array), mode="r")
    return path / array / arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))


def test_a_deleted_shard_file_fails_the_reader_verify_and_training(tmp_path, reference, tiny_student_toml, data):
    path = copy_of(reference, tmp_path)
    _shard_file(path, "features/p3", 1).unlink()
    _shard_file(path, "rois", 2).unlink()
    cache = TeacherCache(str(path))
    assert cache.read(0).features[1].abs().sum() > 0  # intact shards still read
    with pytest.raises(CacheError) as e:
        cache.read(4)
    one_line(e, "item 4", "array features/p3 has no shard file", "delete it")
    with pytest.raises(CacheError) as e:
        TeacherCache(str(path)).read(7)
    one_line(e, "item 7", "array rois")
    problems = TeacherCache(str(path)).verify().problems
    assert any(p.startswith("shard 1: features/p3 shard file") for p in problems), problems
    assert any(p.startswith("shard 2: rois shard file") for p in problems), problems
    # training reads every item: a missing level is an error, never zeros
    for s in range(3):
        f = _shard_file(path, "features/p3", s)
        f.unlink(missing_ok=True)
    res = run(["train", "--student", tiny_student_toml, "--data", data, "--out", tmp_path / "run", "--cache", path,
               "--max-iters", "1", "--batch-size", "2", "--workers", "0"])
    assert_one_line_error(res, "array features/p3 has no shard file")


def test_verify_and_the_reader_find_a_missing_chunk_inside_an_items_extent(tmp_path, reference):
    path = copy_of(reference, tmp_path)
    feats = zarr.open_array(str(path / "features" / "p2"), mode="r+")
    th, tw = feats.chunks[2:]
    feats[4, :, :th, :tw] = 0  # zarr drops an all-fill chunk from the shard: chunk (4, 0, 0) is gone
    zarr.open_array(str(path / "rois"), mode="r+")[5] = 0  # item 5's rois chunk, n_proposals > 0
    problems = TeacherCache(str(path)).verify().problems
    assert any(p.startswith("shard 1 item 4: features/p2 chunk missing inside the item's extent") for p in problems), \
        problems
    assert any(p.startswith("shard 1 item 5: rois chunk missing") for p in problems), problems
    with pytest.raises(CacheError) as e:
        TeacherCache(str(path)).read(5)
    one_line(e, "item 5", "array rois has no chunk")


@pytest.mark.parametrize("edit,words", [
    (lambda m: {**m, "codec": "bf16", "layout": {**m["layout"], "codec": "bf16"}}, ["dtype float16", "implies uint16"]),
    (lambda m: {**m, "layout": {**m["layout"], "max_proposals": 10}}, ["array rois has shape", "max_proposals 10"]),
], ids=["bf16_manifest_over_fp16_arrays", "changed_max_proposals"])
def test_a_manifest_unlike_its_arrays_is_refused_on_opening(tmp_path, reference, tiny_student_toml, data, edit, words):
    path = copy_of(reference, tmp_path)
    edit_manifest(path, edit)
    with pytest.raises(CacheError) as e:
        TeacherCache(str(path))
    one_line(e, *words, "delete it and run extract again")
    assert_one_line_error(run(["verify", path]), *words)
    assert_one_line_error(run(["train", "--student", tiny_student_toml, "--data", data, "--out", tmp_path / "run",
                               "--cache", path, "--max-iters", "1", "--batch-size", "2", "--workers", "0"]), *words)


def _damage(path: Path, kind: str) -> list[str]:
    """Damages a cache; returns words the one-line messages name."""
    if kind == "deleted_array_folder":
        shutil.rmtree(path / "features" / "p3")
        return ["array features/p3 is missing", "delete it"]
    if kind == "corrupted_shard_done_chunk":
        f = path / "shard_done" / "c" / "1"
        raw = bytearray(f.read_bytes())
        raw[0] ^= 0xFF
        f.write_bytes(bytes(raw))
        return ["shard_done marker of shard 1", "delete it"]
    if kind == "truncated_manifest":
        raw = (path / "zarr.json").read_text()
        (path / "zarr.json").write_text(raw[: len(raw) // 2])
        return ["zarr.json", "not valid JSON", "delete it"]
    if kind == "layout_less_manifest":
        edit_manifest(path, lambda m: {k: v for k, v in m.items() if k != "layout"})
        return ["manifest", "has no layout", "delete it"]
    if kind == "non_dict_manifest":
        edit_manifest(path, lambda m: ["not", "a", "manifest"])
        return ["manifest", "is a list, not a mapping", "delete it"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["deleted_array_folder", "corrupted_shard_done_chunk", "truncated_manifest",
                                  "layout_less_manifest", "non_dict_manifest"])
def test_inspect_verify_and_extract_name_the_damage_in_one_line(tmp_path, reference, opts, kind):
    path = copy_of(reference, tmp_path, complete=False)  # extract would resume it
    words = _damage(path, kind)
    before = snapshot(path)
    assert_one_line_error(run(["inspect", path]), *words)
    res = run(["verify", path])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    if kind == "corrupted_shard_done_chunk":  # verify still checks the rest: a PROBLEM line, then the summary
        marker = [l for l in res.output.splitlines() if "shard_done" in l]
        assert len(marker) == 1 and all(w in marker[0] for w in words), res.output
    else:
        assert_one_line_error(res, *words)
    with pytest.raises(UserError) as e:
        extract(opts(path))
    one_line(e, *words)
    assert snapshot(path) == before  # nothing of it deleted or rewritten


# ------------------------------------------------------------------------------------ a full disk
def test_a_full_disk_during_extraction_says_what_is_intact_and_resumes(tmp_path, monkeypatch, opts, reference):
    import zarr.storage._local as local_store
    out = tmp_path / "c.zarr"
    real_put = local_store._put

    def full_disk_put(path, value, exclusive=False):
        if "features/p3/c/1/" in Path(path).as_posix():  # shard 1's p3 file: the disk fills halfway through
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with local_store._atomic_write(Path(path), "wb", exclusive=exclusive) as f:
                f.write(bytes(value.as_buffer_like())[: len(value) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(path, value, exclusive)

    monkeypatch.setattr(local_store, "_put", full_disk_put)
    with pytest.raises(UserError) as e:
        extract(opts(out))
    one_line(e, "no space left on device", "(writing shard 1)", "1 of 3 shards are done and intact",
             "run the same command again")
    assert list(zarr.open_group(str(out), mode="r")["shard_done"][:]) == [True, False, False]
    assert not list(out.rglob("*.partial")) and not (out / "extract.lock").exists()
    monkeypatch.setattr(local_store, "_put", real_put)
    summary = extract(opts(out))
    assert summary["complete"] and summary["written_shards"] == 2
    assert_same_caches(zarr.open_group(str(out), mode="r"), zarr.open_group(str(reference), mode="r"))
