#!/usr/bin/env python
"""Benchmark of a cache on an S3-compatible object store against the same cache on local disk.

The store is moto's S3 server (`moto_server`, from the test extra) on loopback, started here
as a subprocess whose access log is counted: so besides throughput this reports how many HTTP
requests (GET / PUT / HEAD / list) extraction makes per shard and reading makes per item,
which is what decides throughput on a real object store (tens of ms per request, but many
in flight: zarr issues an item's requests concurrently, DataLoader workers add more).
moto is a single Python process on this machine's cores, so its items/s say little about
S3 itself; the request counts carry over.

Measured: `extract` of the same data to local disk and to s3:// (items/s of the loop),
then `TeacherCache.read` through a DataLoader with 0 and 2 workers (items/s) for both,
and the request counts.

Progress goes to stderr; the LAST stdout line is one JSON object (also written to --json).
usage: python pipeline/bench_object_store.py [--images 48] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (add_common_args, command_line, emit, loadavg, log, make_dataset,  # noqa: E402
                          resolve_teacher_checkpoint, work_folder)

BUCKET = "bench"
# werkzeug's access log; partial-content (range) lines come wrapped in colour codes
_REQUEST = re.compile(r'"(?:\x1b\[[0-9;]*m)*(GET|PUT|HEAD|POST|DELETE) (\S+) HTTP')


class MotoServer:
    """`moto_server` on a free loopback port; `requests()` parses its access log so far."""

    def __init__(self, log_path: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log_path = log_path
        self._log = open(log_path, "w")
        exe = Path(sys.executable).with_name("moto_server")
        self.proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("moto_server did not start (is the test extra installed: pip install -e '.[test]'?)")

    def requests(self) -> Counter:
        counts: Counter = Counter()
        for m in _REQUEST.finditer(self.log_path.read_text()):
            method, url = m.groups()
            counts["LIST" if method == "GET" and "list-type" in url else method] += 1
        return counts

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(10)
        self._log.close()


def read_throughput(url: str, storage_options: dict | None, workers: int, seconds: float) -> float:
    import torch
    from torch.utils.data import DataLoader, Dataset

    from defeat_cache.cache import TeacherCache

    class Items(Dataset):
        def __init__(self):
            self.cache = TeacherCache(url, storage_options=storage_options)

        def __len__(self):
            return len(self.cache)

        def __getitem__(self, i):
            return self.cache.read(i).features[0].shape[0]

    ds = Items()
    # one loader over many shuffled passes (workers start once), stopped when the time is up
    order = [i for _ in range(1000) for i in torch.randperm(len(ds)).tolist()]
    n, t0 = 0, time.perf_counter()
    for _ in DataLoader(ds, batch_size=None, num_workers=workers, sampler=order):
        n += 1
        if time.perf_counter() - t0 >= seconds:
            break
    return round(n / (time.perf_counter() - t0), 1)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap, images=48)
    ap.add_argument("--codec", default="fp16")
    ap.add_argument("--proposals", type=int, default=300)
    ap.add_argument("--items-per-shard", type=int, default=8)
    ap.add_argument("--read-seconds", type=float, default=5.0)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    with work_folder(args.work, "bench_s3_") as work, MotoServer(work / "moto.log") as server:
        import s3fs

        from defeat_cache.cache.extract import ExtractOptions, extract
        s3fs.S3FileSystem(endpoint_url=server.endpoint, skip_instance_cache=True).mkdir(BUCKET)
        options = {"endpoint_url": server.endpoint}
        data = make_dataset(work, args.images)
        ckpt, ckpt_kind = resolve_teacher_checkpoint(args.teacher_checkpoint, args.teacher, data, work)
        common = dict(teacher=args.teacher, checkpoint=ckpt, data=str(data), codec=args.codec,
                      proposals=args.proposals, items_per_shard=args.items_per_shard, workers=1, progress=False)
        local = work / "cache.zarr"
        shutil.rmtree(local, ignore_errors=True)
        ex_local = extract(ExtractOptions(out=str(local), **common))
        url = f"s3://{BUCKET}/cache-{int(time.time())}.zarr"
        before = server.requests()
        ex_s3 = extract(ExtractOptions(out=url, storage_options=options, **common))
        written = server.requests() - before
        shards = ex_s3["written_shards"]
        log(f"extract: local {ex_local['items_per_s']} items/s, s3 {ex_s3['items_per_s']} items/s; "
            f"{dict(written)} requests for {shards} shards")

        from defeat_cache.cache import TeacherCache
        cache = TeacherCache(url, storage_options=options)
        before = server.requests()
        items = list(range(0, len(cache), max(1, len(cache) // 16)))
        for i in items:
            cache.read(i)
        per_item = {k: round(v / len(items), 2) for k, v in (server.requests() - before).items()}
        log(f"requests per item read: {per_item}")

        reads = {}
        for workers in (0, 2):
            reads[f"local_workers{workers}"] = read_throughput(str(local), None, workers, args.read_seconds)
            reads[f"s3_workers{workers}"] = read_throughput(url, options, workers, args.read_seconds)
            log(f"read, {workers} workers: local {reads[f'local_workers{workers}']} items/s, "
                f"s3 {reads[f's3_workers{workers}']} items/s")
        result = {
            "command": command_line(), "cpu_count": os.cpu_count(), "loadavg": loadavg(),
            "server": "moto_server (Python, loopback, same machine)", "teacher_checkpoint": ckpt_kind,
            "codec": args.codec, "items": ex_s3["items"], "items_per_shard": args.items_per_shard,
            "extract_items_per_s": {"local": ex_local["items_per_s"], "s3": ex_s3["items_per_s"]},
            "extract_requests_per_shard": {k: round(v / max(shards, 1), 2) for k, v in written.items()},
            "read_requests_per_item": per_item,
            "read_items_per_s": reads,
            "bytes_per_item": round(cache.inspect()["bytes_per_item"]),
        }
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
