"""Per-image seeded sampling (models/sampling.py): what makes a DDP step equal a single-process step."""

from __future__ import annotations

import torch

from defeat_cache.models.sampling import ItemSeededSampler, item_seed, samplers_of, seeded_sampling
from defeat_cache.models.zoo import build_detector


def _matched(n: int, n_pos: int, n_ignored: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(n, dtype=torch.long)
    idx = torch.randperm(n, generator=g)
    m[idx[:n_pos]] = 1 + torch.randint(3, (n_pos,), generator=g)
    m[idx[n_pos:n_pos + n_ignored]] = -1
    return m


def test_an_image_draws_the_same_sample_whatever_its_batch():
    a, b, c = _matched(500, 40, 50, 0), _matched(300, 5, 20, 1), _matched(400, 90, 0, 2)
    seeds = [item_seed(0, 0, i, 0) for i in range(3)]
    sampler = ItemSeededSampler(64, 0.25, "roi")
    sampler.seeds = seeds
    pos_all, neg_all = sampler([a, b, c])
    sampler.seeds = [seeds[1]]
    pos_b, neg_b = sampler([b])
    sampler.seeds = [seeds[2], seeds[0]]
    pos_ca, neg_ca = sampler([c, a])
    assert torch.equal(pos_all[1], pos_b[0]) and torch.equal(neg_all[1], neg_b[0])
    assert torch.equal(pos_all[0], pos_ca[1]) and torch.equal(pos_all[2], pos_ca[0])
    # torchvision's counts: 25% positives at most, topped up with negatives, never ignored entries
    for m, p, n in zip([a, b, c], pos_all, neg_all):
        assert int(p.sum()) == min(16, int((m >= 1).sum())) and int(p.sum() + n.sum()) == 64
        assert bool((m[p.bool()] >= 1).all()) and bool((m[n.bool()] == 0).all())
    # another epoch, another draw; another site, another draw
    sampler.seeds = [item_seed(0, 1, 0, 0)]
    assert not torch.equal(sampler([a])[1][0], neg_all[0])
    rpn = ItemSeededSampler(64, 0.25, "rpn")
    rpn.seeds = [seeds[0]]
    assert not torch.equal(rpn([a])[1][0], neg_all[0])


def test_detectors_sample_per_image_only_inside_seeded_sampling(tiny_model_toml, tiny_retina_toml):
    model = build_detector(str(tiny_model_toml), 9)
    samplers = samplers_of(model)
    assert [s.site for s in samplers] == ["rpn", "roi"]
    assert samplers[1].batch_size_per_image == 32 and samplers[1].positive_fraction == 0.25  # from the TOML
    with seeded_sampling(samplers, [1, 2]):
        assert all(s.seeds == [1, 2] for s in samplers)
    assert all(s.seeds is None for s in samplers)  # torchvision's behaviour again (global RNG)
    assert samplers_of(build_detector(str(tiny_retina_toml), 9)) == []


def test_item_seed_separates_runs_epochs_images_and_views():
    seeds = {item_seed(s, e, i, v) for s in (0, 1) for e in (0, 1) for i in (0, 1, 10) for v in (0, 1)}
    assert len(seeds) == 24 and all(0 <= x < 2**63 for x in seeds)


def test_random_masks_draw_per_image_from_their_generators():
    from defeat_cache.distill.masks import build_level_masks
    from defeat_cache.models.sampling import image_generators

    boxes = [torch.tensor([[4.0, 4.0, 40.0, 36.0]]), torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 16.0, 16.0]])]
    sizes, strides = [(16, 16), (8, 8)], [4, 8]
    seeds = [item_seed(0, 0, 7, 0), item_seed(0, 0, 9, 1)]
    pair = build_level_masks("random", boxes, sizes, strides, generators=image_generators(seeds, "random_mask", "cpu"),
                             finest_scale=8)
    alone = build_level_masks("random", boxes[1:], sizes, strides,
                              generators=image_generators(seeds[1:], "random_mask", "cpu"), finest_scale=8)
    gt = build_level_masks("gt", boxes, sizes, strides, finest_scale=8)
    for lvl in range(2):
        assert torch.equal(pair[lvl][1], alone[lvl][0])
        assert torch.equal(pair[lvl].sum(dim=(1, 2)), gt[lvl].sum(dim=(1, 2)))  # as many cells as the GT mask
    assert any(not torch.equal(pair[lvl], gt[lvl]) for lvl in range(2))  # but elsewhere
