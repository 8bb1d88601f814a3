"""Tests for the Zarr teacher cache (defeat_cache.cache: layout, writer, reader, verify, codecs)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from defeat_cache.cache import (
    CacheLayout,
    CacheMismatchError,
    CacheWriter,
    IncompleteCacheError,
    LevelSpec,
    NonFiniteError,
    NotACacheError,
    ItemMeta,
    TeacherCache,
    image_view,
    item_index,
    meta_columns,
)
from defeat_cache.cache.compact import BasisFitter
from defeat_cache.cache.codec_bench import measure_codec
from defeat_cache.cache.codecs import CODECS
from defeat_cache.models.teacher import TeacherOutput

K = 5
NUM_VIEWS = 2
LEVELS = [LevelSpec("p2", 8, 16, 20), LevelSpec("p3", 8, 8, 10), LevelSpec("p4", 4, 4, 5)]
BACKBONE = [LevelSpec("c3", 6, 8, 10)]
PROVENANCE = {"teacher": "frcnn_r18", "checkpoint_sha256": "ab" * 32, "dataset": {"fingerprint": "f00d"},
              "views": [{"flip": False}, {"flip": True}]}


def make_layout(codec="fp32", num_items=10, items_per_shard=4, backbone=False) -> CacheLayout:
    return CacheLayout(num_items=num_items, items_per_shard=items_per_shard, feature_levels=list(LEVELS),
                       backbone_levels=list(BACKBONE) if backbone else [], max_proposals=12, max_gt=4,
                       num_logits=K, codec=codec, num_views=NUM_VIEWS)


def smooth(gen, c, h, w):
    """Smooth-ish field (like real features: spatially correlated, per-channel scale)."""
    base = torch.randn(1, c, max(2, h // 3), max(2, w // 3), generator=gen)
    x = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)[0]
    scale = torch.rand(c, 1, 1, generator=gen) * 3 + 0.1
    return (x * scale + 0.02 * torch.randn(c, h, w, generator=gen)).float()


def make_item(i: int, layout: CacheLayout, seed=0) -> TeacherOutput:
    gen = torch.Generator().manual_seed(seed * 1000 + i)
    # varied extents: full size for some items, smaller for others
    frac = [1.0, 0.55, 0.8, 0.3][i % 4]
    feats = []
    for spec in layout.feature_levels:
        h = max(1, int(round(spec.max_h * frac)))
        w = max(1, int(round(spec.max_w * (1.0 if i % 3 else frac))))
        feats.append(smooth(gen, spec.channels, h, w))
    bb = None
    if layout.backbone_levels:
        bb = [torch.relu(smooth(gen, s.channels, max(1, int(s.max_h * frac)), s.max_w)) for s in layout.backbone_levels]
    n = [12, 7, 0, 3][i % 4]
    g = 0 if i % 3 == 0 else min(layout.max_gt, 1 + i % 4)
    H, W = feats[0].shape[1] * 4, feats[0].shape[2] * 4
    image, view = image_view(i, NUM_VIEWS)
    return TeacherOutput(
        image_index=image, view_index=view, image_size=(H - 3, W - 1), canvas_size=(H, W),
        features=feats, proposals=torch.rand(n, 4, generator=gen) * 50, objectness=torch.rand(n, generator=gen),
        proposal_logits=torch.randn(n, K, generator=gen), gt_boxes=torch.rand(g, 4, generator=gen) * 50,
        gt_logits=torch.randn(g, K, generator=gen), backbone_features=bb,
    )


def write_all(path, layout, shards=None, provenance=PROVENANCE, seed=0) -> CacheWriter:
    w = CacheWriter.create_or_resume(path, provenance, layout)
    for s in (w.pending_shards() if shards is None else shards):
        w.write_shard(s, [make_item(i, layout, seed) for i in w.shard_items(s)])
    return w


def rel_l2(a, b):
    return float(torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(b.double()))


@pytest.fixture
def fp32_cache(tmp_path):
    layout = make_layout("fp32", backbone=True)
    w = write_all(tmp_path / "c.zarr", layout)
    assert w.mark_complete()
    return tmp_path / "c.zarr", layout


def test_round_trip_fp32_exact(fp32_cache):
    path, layout = fp32_cache
    cache = TeacherCache(path)
    assert len(cache) == layout.num_items and cache.num_views == NUM_VIEWS
    assert cache.manifest["provenance"] == PROVENANCE
    for i in range(layout.num_items):
        ref, got = make_item(i, layout), cache.read(i)
        assert (got.image_index, got.view_index) == (ref.image_index, ref.view_index)
        assert got.image_size == ref.image_size and got.canvas_size == ref.canvas_size
        for a, b in zip(got.features, ref.features):
            assert a.dtype == torch.float32 and a.shape == b.shape and torch.equal(a, b)
        for a, b in zip(got.backbone_features, ref.backbone_features):
            assert torch.equal(a, b)
        for name in ("proposals", "objectness", "proposal_logits", "gt_boxes", "gt_logits"):
            a, b = getattr(got, name), getattr(ref, name)
            assert a.shape == b.shape and torch.equal(a, b), name
    with pytest.raises(IndexError):
        cache.read(layout.num_items)


@pytest.mark.parametrize("codec,tol", [("fp16", 1e-3), ("bf16", 8e-3), ("int8", 1e-2)])
def test_lossy_codecs_within_error(tmp_path, codec, tol):
    layout = make_layout(codec)
    write_all(tmp_path / "c.zarr", layout).mark_complete()
    cache = TeacherCache(tmp_path / "c.zarr")
    worst = 0.0
    for i in range(layout.num_items):
        ref, got = make_item(i, layout), cache.read(i)
        for a, b in zip(got.features, ref.features):
            assert a.shape == b.shape and a.dtype == torch.float32
            worst = max(worst, rel_l2(a, b))
        assert torch.equal(got.proposal_logits, ref.proposal_logits)  # rois are always fp32
    assert worst <= tol, (codec, worst)


def test_int8_smaller_than_fp32(tmp_path):
    sizes = {}
    for codec in ("fp32", "int8"):
        write_all(tmp_path / codec, make_layout(codec)).mark_complete()
        info = TeacherCache(tmp_path / codec).inspect()
        sizes[codec] = info["feature_bytes_per_item"]
    assert sizes["int8"] < 0.4 * sizes["fp32"], sizes


def test_item_index_rule_and_meta_columns():
    layout = make_layout(backbone=True)
    for i in range(layout.num_items):
        assert item_index(*image_view(i, NUM_VIEWS), NUM_VIEWS) == i
        assert layout.item_index(*layout.image_view(i)) == i
    assert layout.image_view(3) == (1, 1)
    meta = ItemMeta(image_index=1, view_index=1, n_proposals=7, n_gt=2, image_size=(61, 79), canvas_size=(64, 80),
                    extents=((16, 20), (8, 10), (4, 5), (8, 10)))
    row = meta.to_row()
    assert row.dtype == np.int64 and len(row) == len(meta_columns(layout))
    named = dict(zip(meta_columns(layout), row.tolist()))
    assert named["canvas_h"] == 64 and named["image_w"] == 79 and named["p3_w"] == 10 and named["backbone.c3_h"] == 8
    assert ItemMeta.from_row(row) == meta and meta.written
    assert not ItemMeta.from_row(np.zeros_like(row)).written


def test_writer_needs_item_identity(tmp_path):
    """A bare teacher output (as teacher_outputs returns it) has no item identity: refused."""
    layout = make_layout()
    w = CacheWriter.create_or_resume(tmp_path / "c.zarr", PROVENANCE, layout)
    items = [make_item(i, layout) for i in w.shard_items(0)]
    items[1] = dataclasses.replace(items[1], canvas_size=None)
    with pytest.raises(ValueError, match="canvas_size must be set"):
        w.write_shard(0, items)
    assert w.pending_shards() == [0, 1, 2]


def test_measure_codec_targets():
    gen = torch.Generator().manual_seed(3)
    feats = [smooth(gen, 16, 48, 64).numpy(), smooth(gen, 16, 24, 32).numpy()]
    res = {c: measure_codec(c, feats, repeats=1) for c in CODECS}
    assert res["fp32"]["max_rel_l2_error"] == 0.0
    assert res["fp16"]["max_rel_l2_error"] <= 1e-3
    assert res["int8"]["max_rel_l2_error"] <= 1e-2
    assert res["int8"]["bytes_per_item"] <= 0.30 * res["fp32"]["fp32_bytes_per_item"]
    # compact: a basis fitted on these features, fewer bytes than fp16 at a bounded error
    assert res["compact"]["bytes_per_item"] < res["fp16"]["bytes_per_item"]
    assert 0 < res["compact"]["max_rel_l2_error"] < 0.5 and res["compact"]["basis_ranks"][0] <= 16
    for r in res.values():
        assert r["encode_MBps"] > 0 and r["decode_MBps"] > 0


def test_resume(tmp_path):
    path, layout = tmp_path / "c.zarr", make_layout("fp16")
    assert layout.num_shards == 3
    w = write_all(path, layout, shards=[1])
    assert not w.mark_complete() and not w.complete
    w2 = CacheWriter.create_or_resume(path, PROVENANCE, layout)
    assert w2.pending_shards() == [0, 2]
    assert list(w2.shard_items(2)) == [8, 9]  # last shard shorter
    other = CacheWriter.create_or_resume(path, PROVENANCE, layout, create=False)  # a non-zero rank
    other.write_shard(2, [make_item(i, layout) for i in other.shard_items(2)])
    with pytest.raises(Exception, match="already written"):
        w2.write_shard(2, [make_item(i, layout) for i in w2.shard_items(2)])
    assert w2.pending_shards() == [0]
    w2.write_shard(0, [make_item(i, layout) for i in w2.shard_items(0)])
    assert w2.pending_shards() == [] and w2.mark_complete() and w2.complete
    assert w2.manifest["complete"] is True
    cache = TeacherCache(path)
    assert torch.allclose(cache.read(9).features[0], make_item(9, layout).features[0], atol=1e-2, rtol=1e-3)
    with pytest.raises(Exception, match="immutable"):
        CacheWriter.create_or_resume(path, PROVENANCE, layout).write_shard(1, [make_item(i, layout) for i in range(4, 8)])


def test_create_false_needs_existing(tmp_path):
    with pytest.raises(NotACacheError):
        CacheWriter.create_or_resume(tmp_path / "nope.zarr", PROVENANCE, make_layout(), create=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(NotACacheError):
        CacheWriter.create_or_resume(tmp_path / "junk", PROVENANCE, make_layout())
    with pytest.raises(NotACacheError):
        TeacherCache(tmp_path / "junk")


def test_mismatch_refused(tmp_path):
    path, layout = tmp_path / "c.zarr", make_layout()
    write_all(path, layout, shards=[0])
    other = dict(PROVENANCE, teacher="frcnn_r50")
    with pytest.raises(CacheMismatchError, match=r'teacher="frcnn_r18".*teacher="frcnn_r50".*new --out') as ei:
        CacheWriter.create_or_resume(path, other, layout)
    assert "checkpoint_sha256" not in str(ei.value)
    with pytest.raises(CacheMismatchError, match=r"dataset\.fingerprint"):
        CacheWriter.create_or_resume(path, dict(PROVENANCE, dataset={"fingerprint": "beef"}), layout)
    with pytest.raises(CacheMismatchError, match="codec"):
        CacheWriter.create_or_resume(path, PROVENANCE, make_layout("int8"))


def test_nonfinite_and_bad_shapes_refused(tmp_path):
    path, layout = tmp_path / "c.zarr", make_layout("fp16")
    w = CacheWriter.create_or_resume(path, PROVENANCE, layout)
    items = [make_item(i, layout) for i in w.shard_items(0)]
    items[2].features[1][3, 1, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"image_index=1, view=0.*features\[p3\]"):
        w.write_shard(0, items)
    items = [make_item(i, layout) for i in w.shard_items(0)]
    items[1].gt_logits = items[1].gt_logits + float("inf") if items[1].gt_logits.numel() else torch.full((1, K), float("inf"))
    items[1].gt_boxes = torch.zeros(items[1].gt_logits.shape[0], 4)
    with pytest.raises(NonFiniteError, match="gt_logits"):
        w.write_shard(0, items)
    items = [make_item(i, layout) for i in w.shard_items(0)]
    items[0].features[0] = items[0].features[0] * 1e5  # overflows float16
    with pytest.raises(NonFiniteError, match="overflow"):
        w.write_shard(0, items)
    items = [make_item(i, layout) for i in w.shard_items(0)]
    items[0].proposals = torch.zeros(13, 4)
    with pytest.raises(ValueError, match="max_proposals"):
        w.write_shard(0, items)
    items = [make_item(i, layout) for i in w.shard_items(0)]
    items[0].features[0] = torch.zeros(8, 17, 4)
    with pytest.raises(ValueError, match="outside layout max"):
        w.write_shard(0, items)
    items = [make_item(i, layout) for i in w.shard_items(0)]
    items[0].features[2] = torch.zeros(5, 2, 2)
    with pytest.raises(ValueError, match=r"shape \[5, 2, 2\], expected \[4, \*, \*\]"):
        w.write_shard(0, items)
    with pytest.raises(ValueError, match="image_index"):
        w.write_shard(0, [make_item(i + 1, layout) for i in w.shard_items(0)])
    with pytest.raises(ValueError, match="got 3"):
        w.write_shard(0, [make_item(i, layout) for i in range(3)])
    assert w.pending_shards() == [0, 1, 2]  # nothing was marked


def test_verify_clean_and_corrupt(fp32_cache):
    path, layout = fp32_cache
    report = TeacherCache(path).verify()
    assert report.ok, report.problems
    assert report.items_checked == layout.num_items and report.shards_done == layout.num_shards
    shard_file = Path(path) / "features" / "p2" / "c" / "1" / "0" / "0" / "0"
    assert shard_file.is_file()
    data = bytearray(shard_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard_file.write_bytes(bytes(data))
    report = TeacherCache(path).verify()
    assert not report.ok
    assert any("shard 1" in p and "features/p2" in p for p in report.problems), report.problems
    # a clean item elsewhere still reads; the corrupt one raises instead of returning garbage
    TeacherCache(path).read(0)
    bad = [p for p in report.problems if "item" in p]
    assert bad
    item = int(bad[0].split("item ")[1].split(":")[0])
    with pytest.raises(Exception, match="checksum"):
        TeacherCache(path).read(item)


def test_verify_reports_missing_shard(tmp_path):
    path, layout = tmp_path / "c.zarr", make_layout()
    write_all(path, layout, shards=[0, 2])
    report = TeacherCache(path, allow_incomplete=True).verify()
    assert not report.ok and any("shard 1" in p and "not marked done" in p for p in report.problems)


def test_incomplete_refused(tmp_path):
    path, layout = tmp_path / "c.zarr", make_layout()
    write_all(path, layout, shards=[0])
    with pytest.raises(IncompleteCacheError, match="incomplete"):
        TeacherCache(path)
    cache = TeacherCache(path, allow_incomplete=True)
    assert torch.equal(cache.read(1).features[0], make_item(1, layout).features[0])
    with pytest.raises(IncompleteCacheError, match="never written"):
        cache.read(5)


def test_inspect_reports_bytes(fp32_cache):
    path, layout = fp32_cache
    info = TeacherCache(path).inspect()
    assert info["items_done"] == info["items_total"] == layout.num_items
    assert info["shards_done"] == layout.num_shards and info["complete"]
    assert info["bytes_total"] > 0 and info["bytes_per_item"] > 0
    assert set(info["arrays"]) >= {"features/p2", "features/p3", "features/p4", "backbone/c3", "rois", "meta", "shard_done"}
    for name in ("features/p2", "rois", "meta"):
        assert info["arrays"][name]["bytes_stored"] > 0 and info["arrays"][name]["bytes_per_item"] > 0
    assert info["levels"]["features/p2"]["padded_hw"] == [16, 20]
    assert info["codec"] == "fp32"


def test_padded_tiles_not_stored(tmp_path):
    """Tiles fully outside an item's extent are fill, so never stored."""
    spec = LevelSpec("p2", 4, 130, 70)  # tiles 64x64, padded to 192x128
    layout = CacheLayout(num_items=2, items_per_shard=2, feature_levels=[spec], backbone_levels=[],
                         max_proposals=2, max_gt=1, num_logits=K, codec="fp32", num_views=1)
    w = CacheWriter.create_or_resume(tmp_path / "c.zarr", {}, layout)
    gen = torch.Generator().manual_seed(0)

    def item(i, h, w_):
        return TeacherOutput([smooth(gen, 4, h, w_) + 5], torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, K),
                             torch.zeros(0, 4), torch.zeros(0, K),
                             image_index=i, view_index=0, image_size=(h * 4, w_ * 4), canvas_size=(h * 4, w_ * 4))

    items = [item(0, 40, 30), item(1, 130, 70)]
    w.write_shard(0, items)
    w.mark_complete()
    cache = TeacherCache(tmp_path / "c.zarr")
    for i in range(2):
        assert torch.equal(cache.read(i).features[0], items[i].features[0])
    stored = cache.inspect()["arrays"]["features/p2"]["bytes_stored"]
    # item 0: 1 tile, item 1: 3x2 tiles; fp32 barely compresses, so ~7 tiles of 4*64*64*4 bytes
    tile_bytes = 4 * 64 * 64 * 4
    assert stored < 7.5 * tile_bytes, stored / tile_bytes


class _DS(torch.utils.data.Dataset):
    def __init__(self, cache):
        self.cache = cache

    def __len__(self):
        return len(self.cache)

    def __getitem__(self, i):
        it = self.cache.read(i)
        return i, it.features[1].sum(), it.proposal_logits.sum()


def test_dataloader_forked_workers(fp32_cache):
    path, layout = fp32_cache
    cache = TeacherCache(path)
    cache.read(0)  # parent opened its arrays before forking
    dl = torch.utils.data.DataLoader(_DS(cache), batch_size=None, num_workers=2,
                                     multiprocessing_context="fork")
    seen = {}
    for i, fsum, lsum in dl:
        seen[int(i)] = (float(fsum), float(lsum))
    assert sorted(seen) == list(range(layout.num_items))
    for i, (fsum, lsum) in seen.items():
        ref = make_item(i, layout)
        assert math.isclose(fsum, float(ref.features[1].sum()), rel_tol=1e-6, abs_tol=1e-5)
        assert math.isclose(lsum, float(ref.proposal_logits.sum()), rel_tol=1e-6, abs_tol=1e-5)


def test_codec_units():
    x = (np.random.default_rng(0).standard_normal((2, 3, 9, 11)) * np.array([1e-3, 1.0, 1e3])[None, :, None, None]).astype(np.float32)
    # bf16 bits are torch's round-to-nearest-even conversion
    st, _ = CODECS["bf16"].encode(x)
    assert st.dtype == np.uint16
    assert np.array_equal(st, torch.from_numpy(x).bfloat16().view(torch.int16).numpy().view(np.uint16))
    assert torch.equal(CODECS["bf16"].decode(torch.from_numpy(st.view(np.int16))), torch.from_numpy(x).bfloat16().float())
    # int8: statistics over each item's own extent only, padding stored as 0
    pos = np.abs(x) + 10.0
    padded = np.zeros_like(pos)
    padded[0, :, :5, :7] = pos[0, :, :5, :7]
    padded[1] = pos[1]
    q, prm = CODECS["int8"].encode(padded, extents=[(5, 7), (9, 11)])
    assert q.dtype == np.uint8 and prm.shape == (2, 3, 2)
    assert np.allclose(prm[0, :, 0], pos[0, :, :5, :7].min(axis=(1, 2)))
    assert (q[0, :, 5:, :] == 0).all() and (q[0, :, :, 7:] == 0).all()
    dec = CODECS["int8"].decode(torch.from_numpy(q), torch.from_numpy(prm)).numpy()
    assert np.abs(dec[0, :, :5, :7] - pos[0, :, :5, :7]).max() <= (prm[0, :, 1].max() / 2) * 1.001
    # a constant channel decodes exactly
    c = np.full((1, 1, 3, 3), 2.5, np.float32)
    q, prm = CODECS["int8"].encode(c)
    assert torch.equal(CODECS["int8"].decode(torch.from_numpy(q), torch.from_numpy(prm)), torch.from_numpy(c))
    fitter = BasisFitter(3)
    for item in x:
        fitter.add(torch.from_numpy(item))
    basis = fitter.fit(2.0)
    for name, codec in CODECS.items():
        st, prm = codec.encode(x, basis=basis if codec.needs_basis else None)
        assert st.dtype == codec.stored_dtype, name
        assert (prm is not None) == codec.has_params, name
