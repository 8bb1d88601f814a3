"""Checkpoint formats: every supported file form reads into the same state dict through `read_weights`."""

from __future__ import annotations

import argparse
import collections

import pytest
import torch

from defeat_cache.errors import UserError
from defeat_cache.models.checkpoint import load_weights, read_weights, trained_model_payload
from defeat_cache.models.zoo import build_detector, load_model_spec


@pytest.fixture(scope="module")
def tiny_state(tiny_model_toml):
    torch.manual_seed(0)
    return build_detector(str(tiny_model_toml), 4).state_dict()


def _references_checkpoint(state: dict) -> dict:
    """What torchvision's references/detection/train.py saves (utils.save_on_master(checkpoint, ...))."""
    model = torch.nn.Linear(2, 2)  # any module: the optimizer and scheduler state are plain dicts
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()  # momentum buffers in the state
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[16, 22], gamma=0.1)
    args = argparse.Namespace(model="fasterrcnn_resnet50_fpn_v2", lr=0.02, epochs=26, data_path="/data/coco",
                              aspect_ratio_group_factor=3, weights=None, amp=True, lr_steps=[16, 22])
    return {"model": state, "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
            "args": args, "epoch": 25, "scaler": {"scale": 65536.0}}


def _ours(state: dict, tiny_model_toml) -> dict:
    from defeat_cache.views import Preprocessing
    return trained_model_payload(load_model_spec(str(tiny_model_toml)), 4, ["__background__", "a", "b", "c"],
                                 Preprocessing(), 7, state)


FORMATS = {
    "plain": (lambda s, _: s, "plain state dict"),
    "model_wrapper": (lambda s, _: {"model": s}, "{'model': ...} wrapper"),
    "state_dict_wrapper": (lambda s, _: {"state_dict": s, "meta": {"epoch": 12}}, "{'state_dict': ...} wrapper"),
    "ordered_dict": (lambda s, _: collections.OrderedDict(s), "plain state dict"),
    "ddp": (lambda s, _: {"model": {f"module.{k}": v for k, v in s.items()}}, "saved from DDP"),
    "torchvision_references": (lambda s, _: _references_checkpoint(s),
                               "torchvision references checkpoint (epoch 25, fasterrcnn_resnet50_fpn_v2)"),
    "ours": (_ours, "defeat-cache training checkpoint (tiny_frcnn, iteration 7)"),
}


@pytest.mark.parametrize("form", sorted(FORMATS))
def test_every_format_reads_into_the_same_state_dict(form, tmp_path, tiny_state, tiny_model_toml):
    make, source = FORMATS[form]
    torch.save(make(tiny_state, tiny_model_toml), tmp_path / "ck.pth")
    weights = read_weights(tmp_path / "ck.pth")
    assert source in weights.source
    assert list(weights.state) == list(tiny_state)
    assert all(torch.equal(weights.state[k], tiny_state[k]) for k in tiny_state)
    torch.manual_seed(5)
    model = build_detector(str(tiny_model_toml), 4)
    loaded = load_weights(model, tmp_path / "ck.pth")
    assert loaded.part == "detector" and source in str(loaded)
    assert all(torch.equal(model.state_dict()[k], tiny_state[k]) for k in tiny_state)


class _NotAllowed:
    pass


def test_foreign_python_objects_are_refused_in_one_line(tmp_path, tiny_state):
    torch.save({"model": tiny_state, "args": _NotAllowed()}, tmp_path / "obj.pth")
    with pytest.raises(UserError) as e:
        read_weights(tmp_path / "obj.pth")
    msg = str(e.value)
    assert "\n" not in msg and "_NotAllowed" in msg and "weights_only" in msg and "state_dict()" in msg


def test_a_dict_without_weights_is_refused(tmp_path):
    torch.save({"epoch": 3, "args": argparse.Namespace(lr=0.1)}, tmp_path / "empty.pth")
    with pytest.raises(UserError, match=r"no state dict found \(top-level keys: args, epoch\)"):
        read_weights(tmp_path / "empty.pth")


def test_imagenet_mobilenet_weights_load_into_the_body(tmp_path):
    """A torchvision mobilenet_v3_large ImageNet state dict (`features.*`, `classifier.*`) starts the
    zoo's MobileNetV3 student."""
    from torchvision.models import mobilenet_v3_large
    from torchvision.ops import FrozenBatchNorm2d
    torch.manual_seed(0)
    net = mobilenet_v3_large(norm_layer=FrozenBatchNorm2d)
    torch.save(net.state_dict(), tmp_path / "mbv3_imagenet.pth")
    torch.manual_seed(1)
    model = build_detector("mobilenet_v3_fpn", 3)
    assert load_weights(model, tmp_path / "mbv3_imagenet.pth").part == "backbone"
    body = model.backbone.body.state_dict()
    assert all(torch.equal(body[k], v) for k, v in net.features.state_dict().items())
