"""Network cards (`models.factory.network_card` / `network_from_card`) and
`network.trained_network`: a training stage's network is rebuilt from the JSON beside its
checkpoints, exactly (class, constructor arguments, input normalisation, input size)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oeem_jax.models import factory
from oeem_jax.models.classifier import CAMClassifier
from oeem_jax.models.network import normalizer, trained_network
from oeem_jax.models.pspnet import PSPNet
from oeem_jax.runtime import artifacts

EFF_STATS = ((127.0, 127.0, 127.0), (128.0, 128.0, 128.0))


def _json_round_trip(card):
  return json.loads(json.dumps(card))


def _shapes(model, size=32):
  abstract = jax.eval_shape(lambda r: model.init({"params": r, "dropout": r}, jnp.zeros((1, size, size, 3)),
                                                 train=False), jax.random.PRNGKey(0))
  return jax.tree.map(lambda a: (a.shape, str(a.dtype)), abstract)


@pytest.mark.parametrize("model, kind, stats, size", [
    (CAMClassifier(width=0.125, num_classes=2, b7_dilation=3, bn_frozen=True, dtype=jnp.bfloat16,
                   backbone_name="efficientnet_lite0", conv_impl="xla"), "cls", EFF_STATS, 112),
    (PSPNet(width=0.125, num_classes=2, b7_dilation=2, dtype=jnp.float32, backbone_name="resnet38",
            backbone_bn_frozen=True), "seg", None, 256),
])
def test_card_round_trip_rebuilds_the_same_network(model, kind, stats, size):
  card = _json_round_trip(factory.network_card(model, input_kind=kind, input_stats=stats, input_size=size))
  assert card["format"] == factory.CARD_FORMAT and card["network"] == type(model).__name__
  assert card["input"] == {"kind": kind, "size": size,
                           "stats": None if stats is None else [list(s) for s in stats]}
  rebuilt = factory.network_from_card(card)
  assert type(rebuilt) is type(model)
  for name, value in card["kwargs"].items():
    want = getattr(model, name)
    assert getattr(rebuilt, name) == want, name
  assert rebuilt.dtype == model.dtype and card["kwargs"]["dtype"] == np.dtype(model.dtype).name
  assert card["kwargs"]["width"] == 0.125 and "parent" not in card["kwargs"] and "name" not in card["kwargs"]
  assert factory.network_card(rebuilt, input_kind=kind, input_stats=stats, input_size=size) == card
  assert _shapes(rebuilt) == _shapes(model)


def test_card_errors_name_the_problem():
  card = factory.network_card(PSPNet(width=0.125), input_kind="seg", input_stats=None, input_size=64)
  with pytest.raises(ValueError, match="format 'other/1'; expected 'oeem_jax-network/1'"):
    factory.network_from_card({**card, "format": "other/1"})
  with pytest.raises(ValueError, match="names 'UNet'; expected one of"):
    factory.network_from_card({**card, "network": "UNet"})
  with pytest.raises(ValueError, match=r"PSPNet takes no argument\(s\) \['depth'\]"):
    factory.network_from_card({**card, "kwargs": {**card["kwargs"], "depth": 50}})
  with pytest.raises(ValueError, match="cannot describe a Dense"):
    import flax.linen as nn
    factory.network_card(nn.Dense(3), input_kind="seg", input_stats=None, input_size=64)


def _legacy_summary(folder, stage, model_cfg, section):
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "summary.json").write_text(json.dumps({"stage": stage, "config": {"model": model_cfg, stage: section}}))


def test_trained_network_reads_the_card_and_falls_back_to_an_old_summary(tmp_path):
  model = PSPNet(width=0.125, b7_dilation=4, backbone_name="efficientnet_lite0")
  card = factory.network_card(model, input_kind="seg", input_stats=EFF_STATS, input_size=96)
  artifacts.write_network_card(tmp_path / "seg", card)
  net = trained_network(tmp_path / "seg", "seg")
  assert net.card == _json_round_trip(card) and net.input_size == 96 and type(net.model) is PSPNet
  assert net.model.backbone_name == "efficientnet_lite0" and net.model.width == 0.125
  image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 7
  np.testing.assert_array_equal(np.asarray(net.normalize(image)),
                                np.asarray(normalizer("seg", EFF_STATS)(image)))
  np.testing.assert_allclose(np.asarray(net.normalize(image))[0, 0], (np.array([0, 7, 14]) - 127) / 128, rtol=1e-6)

  # An older run: no network.json, only the finished stage's config; the same card comes out.
  old = tmp_path / "old" / "cls"
  _legacy_summary(old, "cls", {"width": 0.125, "dtype": "float32", "backbone": "resnet38", "bn": "auto",
                               "init_checkpoint": ""}, {"input_size": 112, "num_classes": 2, "b7_dilation": 2})
  net = trained_network(old, "cls")
  want = factory.network_card(CAMClassifier(width=0.125, b7_dilation=2, bn_frozen=False),
                              input_kind="cls", input_stats=None, input_size=112)
  assert net.card == want and net.input_size == 112 and net.normalize is normalizer("cls", None)


def test_trained_network_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no network.json and no summary.json; expected the folder of a seg"):
    trained_network(tmp_path, "seg")
  card = factory.network_card(CAMClassifier(width=0.125), input_kind="cls", input_stats=None, input_size=112)
  artifacts.write_network_card(tmp_path, card)
  with pytest.raises(ValueError, match="the network of a 'cls' stage; expected a 'seg' stage folder"):
    trained_network(tmp_path, "seg")
  artifacts.network_card_path(tmp_path).write_text("[1, 2]")
  with pytest.raises(ValueError, match="network.json: expected a JSON object"):
    trained_network(tmp_path, "seg")
  artifacts.network_card_path(tmp_path).write_text("{not json")
  with pytest.raises(ValueError, match="network.json: unreadable network card"):
    trained_network(tmp_path, "seg")
