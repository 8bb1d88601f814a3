"""Caches on object storage: extract to, inspect, verify and train from s3:// URLs.

The S3 endpoint is moto's server mode on loopback (a real HTTP S3 API, started in-process);
s3fs talks to it exactly as it would to AWS or MinIO, so these tests cover the whole
fsspec path: zarr's FsspecStore, DataLoader workers forked after the client was created,
storage options from the CLI and credentials from the environment.
"""

from __future__ import annotations

import json
import os
from unittest import mock

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from defeat_cache.cache import CacheError, TeacherCache, parse_storage_options
from defeat_cache.cache.extract import extract
from defeat_cache.cli import main as cli

from builders import cli_extract_argv, tiny_extract_options, torchrun
from checks import assert_same_caches, run_metrics

moto_server = pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

BUCKET = "defeat-test"


@pytest.fixture(scope="module")
def s3():
    """(endpoint_url, storage_options) of a moto S3 server on loopback holding an empty bucket."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    with mock.patch.dict(os.environ, env):
        import s3fs
        s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True).mkdir(BUCKET)
        yield endpoint, {"endpoint_url": endpoint}
    server.stop()


@pytest.fixture(scope="module")
def s3_cache(s3, tiny_model_toml, tiny_teacher_checkpoint, tiny_shapes) -> str:
    """The tiny fp32 cache, extracted straight to S3 with the settings of ``tiny_cache``."""
    _, options = s3
    url = f"s3://{BUCKET}/tiny_fp32.zarr"
    summary = extract(tiny_extract_options(tiny_model_toml, tiny_teacher_checkpoint, tiny_shapes, url,
                                           storage_options=options))
    assert summary["complete"]
    return url


def test_extraction_to_s3_equals_local_extraction(s3, s3_cache, tiny_cache):
    _, options = s3
    assert_same_caches(zarr.open_group(s3_cache, mode="r", storage_options=options),
                       zarr.open_group(tiny_cache("fp32"), mode="r"))
    a, b = TeacherCache(s3_cache, storage_options=options), TeacherCache(tiny_cache("fp32"))
    assert a.manifest["complete"] and a.provenance() == b.provenance()
    for i in (0, len(a) - 1):
        x, y = a.read(i), b.read(i)
        assert all(np.array_equal(u.numpy(), v.numpy()) for u, v in zip(x.features, y.features))
        assert np.array_equal(x.proposal_logits.numpy(), y.proposal_logits.numpy())


def test_cli_inspect_and_verify_an_s3_cache(s3, s3_cache):
    endpoint, _ = s3
    runner = CliRunner()
    res = runner.invoke(cli, ["inspect", s3_cache, "--json", "--storage-option", f"endpoint_url={endpoint}"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["complete"] and info["items_done"] == info["items_total"] == 24 and info["bytes_total"] > 0
    res = runner.invoke(cli, ["verify", s3_cache, "--storage-option", f"endpoint_url={endpoint}"])
    assert res.exit_code == 0, res.output
    assert "OK: 24 items" in res.output


def test_train_streams_an_s3_cache_through_forked_workers(tmp_path, s3, s3_cache, tiny_student_toml, tiny_shapes):
    """Two DataLoader workers (forked after the S3 client exists) read the cache over HTTP."""
    endpoint, _ = s3
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["train", "--student", str(tiny_student_toml), "--data", str(tiny_shapes),
                                   "--out", str(out), "--cache", s3_cache, "--storage-option",
                                   f"endpoint_url={endpoint}", "--max-iters", "2", "--batch-size", "2",
                                   "--workers", "2", "--log-every", "1"])
    assert res.exit_code == 0, res.output
    lines = run_metrics(out)
    assert [m["iter"] for m in lines] == [1, 2]
    assert all(m["loss_neck_obj"] > 0 and m["loss_cls_pos"] > 0 for m in lines)  # teacher targets arrived
    config = json.loads((out / "config.json").read_text())
    assert config["options"]["storage_options"] == ["endpoint_url"]  # names only: options may hold secrets


def test_unreachable_endpoint_is_one_clear_error(s3_cache):
    res = CliRunner().invoke(cli, ["inspect", s3_cache, "--storage-option", "endpoint_url=http://127.0.0.1:9",
                                   "--storage-option", "config_kwargs.retries.max_attempts=1"])
    assert res.exit_code == 1
    assert res.output.startswith("Error: ") and "cannot open" in res.output and "endpoint" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


def test_missing_s3_cache_is_named(s3):
    _, options = s3
    with pytest.raises(CacheError, match=f"no cache at s3://{BUCKET}/nothing.zarr"):
        TeacherCache(f"s3://{BUCKET}/nothing.zarr", storage_options=options)


def test_storage_options_on_a_local_path_are_refused(tmp_path, tiny_cache):
    with pytest.raises(CacheError, match="apply to URLs"):
        TeacherCache(tiny_cache("fp32"), storage_options={"anon": True})


def test_parse_storage_options():
    assert parse_storage_options(["endpoint_url=http://h:9000", "anon=true", "client_kwargs.region_name=eu-west-1",
                                  "config_kwargs.retries.max_attempts=3", "key=12345", "secret=007",
                                  "token=true"]) == {
        "endpoint_url": "http://h:9000", "anon": True, "client_kwargs": {"region_name": "eu-west-1"},
        "config_kwargs": {"retries": {"max_attempts": 3}},
        "key": "12345", "secret": "007", "token": "true"}  # secrets stay strings, whatever they look like
    assert parse_storage_options([]) == {}
    with pytest.raises(CacheError, match="KEY=VALUE"):
        parse_storage_options(["endpoint_url"])
    with pytest.raises(CacheError, match="client_kwargs") as e:
        parse_storage_options(["client_kwargs.region_name=eu-west-1", "client_kwargs=hunter2"])
    assert "hunter2" not in str(e.value)  # errors never echo a value


def test_extraction_refuses_a_prefix_holding_other_objects(s3, tiny_model_toml, tiny_teacher_checkpoint,
                                                           tiny_shapes):
    """zarr's create mode deletes everything under the path: a bucket or folder of other data
    must be refused, and survive."""
    import s3fs
    endpoint, options = s3
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    fs.pipe(f"{BUCKET}/datasets/coco/annotations.json", b"{}")
    for out in (f"s3://{BUCKET}/datasets", f"s3://{BUCKET}"):
        with pytest.raises(CacheError, match="already holds objects"):
            extract(tiny_extract_options(tiny_model_toml, tiny_teacher_checkpoint, tiny_shapes, out,
                                         storage_options=options))
    assert fs.cat(f"{BUCKET}/datasets/coco/annotations.json") == b"{}"


def test_two_rank_extraction_to_s3(s3, reference_cache, tiny_model_toml, tiny_teacher_checkpoint, tiny_shapes):
    """torchrun ranks writing their own shards of one s3:// cache (what a cluster's nodes do)
    give the same arrays as one process; credentials reach the ranks through the environment."""
    endpoint, options = s3
    url = f"s3://{BUCKET}/two_ranks.zarr"
    r = torchrun(["-m", "defeat_cache", *cli_extract_argv(tiny_model_toml, tiny_teacher_checkpoint, tiny_shapes, url),
                  "--storage-option", f"endpoint_url={endpoint}"])
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][-1])
    assert summary["complete"] and summary["items"] == 24 and summary["ranks"] == 2
    assert_same_caches(zarr.open_group(url, mode="r", storage_options=options),
                       zarr.open_group(reference_cache, mode="r"), atol=0)


def test_extraction_lock_on_s3(s3, tiny_model_toml, tiny_teacher_checkpoint, tiny_shapes):
    """The lock object is created only if absent (a conditional PUT): a second job is refused naming
    the holder and writes nothing; a stale lock (its process gone, this host) is taken over."""
    import s3fs
    from defeat_cache.cache.lock import LOCK_NAME, ExtractLock, LockHolder
    endpoint, options = s3
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    url = f"s3://{BUCKET}/locked.zarr"
    first = ExtractLock(url, options)
    first.acquire()
    with pytest.raises(CacheError, match=f"being written by another extract .*pid {os.getpid()}, started"):
        ExtractLock(url, options).acquire()
    with pytest.raises(CacheError, match="being written by another extract"):
        extract(tiny_extract_options(tiny_model_toml, tiny_teacher_checkpoint, tiny_shapes, url,
                                     storage_options=options))
    assert fs.ls(f"{BUCKET}/locked.zarr", detail=False) == [f"{BUCKET}/locked.zarr/{LOCK_NAME}"]  # nothing else
    first.release()
    fs.invalidate_cache()
    assert not fs.exists(f"{BUCKET}/locked.zarr/{LOCK_NAME}")
    dead = LockHolder(first.me.host, 2 ** 22 + 7, "2026-01-01T00:00:00+00:00", "0" * 32)  # no such pid
    fs.pipe(f"{BUCKET}/locked.zarr/{LOCK_NAME}", dead.to_bytes())
    taker = ExtractLock(url, options)
    taker.acquire()
    assert LockHolder.from_bytes(fs.cat(f"{BUCKET}/locked.zarr/{LOCK_NAME}")).token == taker.me.token
    taker.release()
    fs.invalidate_cache()
    assert not fs.exists(f"{BUCKET}/locked.zarr/{LOCK_NAME}")
