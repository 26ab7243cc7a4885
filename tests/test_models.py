"""Shapes, parameter counts, pooling, CAM, BatchNorm modes, masks and init of oeem_jax.models.

Width-1.0 checks use jax.eval_shape (no allocation); numerical checks run at width 1/32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from oeem_jax.engine.optim import mask_frozen
from oeem_jax.models import (
  CAMClassifier,
  PSPNet,
  ResNet38,
  adaptive_avg_pool,
  adaptive_pool_matrix,
  feature_size,
  init_variables,
  scaled_channels,
  trainable_mask,
)
from oeem_jax.models.pspnet import PSPHead, resize_bilinear
from oeem_jax.models.resnet38 import dropout2d

TINY = 1 / 32  # channels 2..128


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract(model, shape):
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  return jax.eval_shape(lambda: model.init(rngs, jnp.zeros(shape), train=False))


def host_variables(model, shape=(1, 16, 16, 3), seed: int = 0):
  """Variables with model.init's structure, filled on the host (compiling model.init costs ~10 s).

  Conv/dense kernels ~ N(0, 1/fan_in), BN scale ~ 1 + N(0, 0.1^2), biases and means ~ N(0, 0.1^2),
  running variances ~ U(0.5, 1.5).
  """
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = str(path[-1].key)
    if name == "kernel":
      return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1])), s.dtype)
    if name == "var":
      return jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype)
    base = 1.0 if name == "scale" else 0.0
    return jnp.asarray(base + 0.1 * rng.standard_normal(s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, _abstract(model, shape))


@pytest.fixture(scope="module")
def tiny_cls():
  model = CAMClassifier(width=TINY)
  apply = jax.jit(lambda v, x: (model.apply(v, x, train=False), model.apply(v, x, method=CAMClassifier.cam)))
  return model, host_variables(model), apply


# ---- shapes -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size,expected", [(112, 14), (113, 15), (224, 28), (256, 32), (57, 8), (64, 8)])
def test_feature_size_matches_pytorch(size, expected):
  # PyTorch: 3x3/pad 1/stride 2 three times -> floor((H + 2 - 3)/2) + 1 = ceil(H/2) each time.
  assert feature_size(size) == expected


def test_backbone_shapes_width1_odd_and_even():
  model = ResNet38(width=1.0)
  v = _abstract(model, (1, 32, 32, 3))
  for h, w in [(112, 112), (113, 113), (256, 224)]:
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), v,
                         jax.ShapeDtypeStruct((2, h, w, 3), jnp.float32))
    fh, fw = feature_size(h), feature_size(w)
    assert out["b5_in"].shape == (2, fh, fw, 512)
    assert out["b6_in"].shape == (2, fh, fw, 1024)
    assert out["out"].shape == (2, fh, fw, 4096)


def test_padding_is_symmetric_not_same():
  # A stride-2 3x3 conv with our padding on an even input reads pixel (0, 0) at the first output and
  # never the last row; Flax "SAME" would pad (0, 1) and shift the sampling grid by one pixel.
  from oeem_jax.models.resnet38 import conv
  layer = conv(1, 3, stride=2, name="c")
  x = jnp.arange(36, dtype=jnp.float32).reshape(1, 6, 6, 1)
  k = jnp.zeros((3, 3, 1, 1)).at[1, 1, 0, 0].set(1.0)  # identity tap at the centre
  y = layer.apply({"params": {"kernel": k}}, x)
  np.testing.assert_array_equal(y[0, :, :, 0], np.arange(36).reshape(6, 6)[0::2, 0::2])


@pytest.mark.parametrize("kernel,stride,dilation,h,w", [(3, 2, 1, 9, 10), (3, 1, 2, 8, 8), (3, 1, 4, 5, 6),
                                                         (1, 2, 1, 7, 6)])
def test_conv_gradient_implementations_agree(kernel, stride, dilation, h, w):
  # 'dots' (1x1 as matmul, im2col weight gradient; the CPU default) == XLA's own conv and gradients.
  from oeem_jax.models import resnet38
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, h, w, 3)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((kernel, kernel, 3, 4)), jnp.float32)
  out = {}
  for impl in ("xla", "dots"):
    f = lambda x, k, impl=impl: jnp.sum(jnp.sin(resnet38.conv2d(x, k, stride, dilation, impl)))  # noqa: E731
    out[impl] = (resnet38.conv2d(x, k, stride, dilation, impl),) + jax.grad(f, argnums=(0, 1))(x, k)
  assert out["xla"][0].shape == (2, (h - 1) // stride + 1, (w - 1) // stride + 1, 4)
  for a, b in zip(out["xla"], out["dots"]):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


def test_classifier_and_pspnet_run_odd_even(tiny_cls):
  _, v, apply = tiny_cls
  logits, cam = apply(v, jnp.ones((2, 57, 57, 3)))  # odd; PSPNet below runs an even size
  assert logits.shape == (2, 2) and logits.dtype == jnp.float32
  assert cam.shape == (2, 8, 8, 2) and cam.dtype == jnp.float32
  psp = PSPNet(width=1.0)
  vp = _abstract(psp, (1, 32, 32, 3))
  for s in (113, 256):
    lo, aux = jax.eval_shape(lambda v, x: psp.apply(v, x, train=False), vp,
                             jax.ShapeDtypeStruct((2, s, s, 3), jnp.float32))
    assert lo.shape == aux.shape == (2, s, s, 2) and lo.dtype == jnp.float32


# ---- parameter counts -----------------------------------------------------------------------------------

def test_param_counts_width1():
  v = _abstract(ResNet38(width=1.0), (1, 16, 16, 3))
  assert _count(v["params"]) == 105_070_912  # PyTorch count incl. BN weight/bias
  assert _count(v["batch_stats"]) == 47_744  # running_mean + running_var
  # BN scale+bias == running mean+var entries (one pair per BN channel).
  bn = sum(int(np.prod(s.shape)) for p, s in jax.tree_util.tree_flatten_with_path(v["params"])[0]
           if str(p[-2].key).startswith("bn"))
  assert bn == 47_744

  vc = _abstract(CAMClassifier(width=1.0), (1, 16, 16, 3))
  assert vc["params"]["fc"]["kernel"].shape == (5632, 2)
  assert _count(vc["params"]) == 105_070_912 + 5632 * 2 + 2

  vp = _abstract(PSPNet(width=1.0), (1, 16, 16, 3))
  decode = 4 * (4096 * 512 + 2 * 512) + (9 * 6144 * 512 + 2 * 512) + (512 * 2 + 2)
  aux = (9 * 1024 * 256 + 2 * 256) + (256 * 2 + 2)
  assert _count(vp["params"]) == 105_070_912 + decode + aux
  assert _count(vp["batch_stats"]) == 47_744 + 2 * (5 * 512 + 256)


def test_scaled_channels():
  assert [scaled_channels(c, 0.25) for c in (64, 512, 4096)] == [16, 128, 1024]
  assert scaled_channels(64, 1 / 128) == 1 and scaled_channels(96, 1 / 64) == 2  # round, at least 1
  with pytest.raises(ValueError, match="width"):
    scaled_channels(64, 0.0)


# ---- adaptive pooling and resize -----------------------------------------------------------------------

def _numpy_adaptive_pool(x: np.ndarray, bins: int) -> np.ndarray:
  n, h, w, c = x.shape
  out = np.zeros((n, bins, bins, c), np.float64)
  for i in range(bins):
    h0, h1 = int(np.floor(i * h / bins)), int(np.ceil((i + 1) * h / bins))
    for j in range(bins):
      w0, w1 = int(np.floor(j * w / bins)), int(np.ceil((j + 1) * w / bins))
      out[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
  return out


def test_adaptive_pool_bin_edges_hand_worked():
  m = adaptive_pool_matrix(32, 3)  # bins [0, 11), [10, 22), [21, 32): overlapping, as PyTorch
  assert [tuple(np.flatnonzero(r)[[0, -1]]) for r in m] == [(0, 10), (10, 21), (21, 31)]
  np.testing.assert_allclose(m.sum(1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(m[0, 0], 1 / 11)
  m6 = adaptive_pool_matrix(32, 6)  # floor(32i/6)..ceil(32(i+1)/6)
  assert [tuple(np.flatnonzero(r)[[0, -1]] + [0, 1]) for r in m6] == [(0, 6), (5, 11), (10, 16), (16, 22),
                                                                       (21, 27), (26, 32)]


@pytest.mark.parametrize("h,w", [(32, 32), (10, 7), (5, 13)])
def test_adaptive_pool_matches_numpy(h, w):
  x = np.random.default_rng(0).standard_normal((2, h, w, 3)).astype(np.float32)
  for b in (1, 2, 3, 6):
    np.testing.assert_allclose(np.asarray(adaptive_avg_pool(jnp.asarray(x), b)), _numpy_adaptive_pool(x, b),
                               atol=1e-5)


def test_resize_bilinear_half_pixel():
  x = jnp.array([0.0, 1.0]).reshape(1, 1, 2, 1)
  y = resize_bilinear(x, 1, 4)  # half-pixel: sample at -0.25, 0.25, 0.75, 1.25 (clamped)
  np.testing.assert_allclose(np.asarray(y).ravel(), [0.0, 0.25, 0.75, 1.0], atol=1e-6)


# ---- CAM ------------------------------------------------------------------------------------------------

def test_cam_average_equals_logits(tiny_cls):
  _, v, apply = tiny_cls
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 57, 57, 3)), jnp.float32)
  logits, cam = apply(v, x)
  np.testing.assert_allclose(np.asarray(cam.mean(axis=(1, 2))), np.asarray(logits), atol=1e-5)
  # Raw scores with bias: not clipped at 0, and the two classes differ.
  assert float(cam.min()) < 0 < float(cam.max()) or not np.allclose(cam[..., 0], cam[..., 1])


# ---- BatchNorm modes and dropout ------------------------------------------------------------------------

def test_frozen_bn_uses_running_stats_and_does_not_update():
  model = ResNet38(width=TINY, bn_frozen=True)
  v = host_variables(model)  # non-trivial running statistics: "running vs batch" makes a difference
  x = jnp.asarray(np.random.default_rng(1).normal(1.0, 2.0, (3, 24, 24, 3)), jnp.float32)

  @jax.jit
  def run(v, x):
    return model.apply(v, x, train=True, rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"])

  out, upd = run(v, x)
  jax.tree.map(np.testing.assert_array_equal, upd["batch_stats"], v["batch_stats"])
  # Per-sample independence: with running statistics, sample 0's stage-5 input does not depend on the
  # rest of the batch (b5_in lies before the first dropout).
  out2, _ = run(v, x.at[1:].set(0.0))
  np.testing.assert_allclose(np.asarray(out["b5_in"][0]), np.asarray(out2["b5_in"][0]), atol=1e-5)


def test_dropout2d_drops_whole_channels():
  layer = dropout2d(0.5, deterministic=False)
  y = np.asarray(layer.apply({}, jnp.ones((4, 5, 6, 64)), rngs={"dropout": jax.random.key(0)}))
  per_channel = y.reshape(4, 30, 64)
  assert np.all(per_channel.min(1) == per_channel.max(1))  # constant over H, W
  assert set(np.unique(y)) == {0.0, 2.0}  # kept channels scaled by 1/(1-p)
  assert 0.3 < (per_channel[:, 0] == 0).mean() < 0.7


# ---- masks and init -------------------------------------------------------------------------------------

def test_trainable_mask_and_freeze():
  params = _abstract(CAMClassifier(width=1.0), (1, 16, 16, 3))["params"]
  total = _count(params)

  def n_trainable(mask):
    return sum(int(np.prod(p.shape)) for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m)

  assert n_trainable(trainable_mask(params, freeze_stem=False)) == total
  m = trainable_mask(params, freeze_stem=True, freeze_bn=True)
  assert m["backbone"]["conv1a"]["kernel"] is False
  assert m["backbone"]["b4_3"]["bn_branch2b1"]["scale"] is False and m["backbone"]["bn7"]["bias"] is False
  assert m["backbone"]["b4_3"]["conv_branch2a"]["kernel"] is True and m["fc"]["bias"] is True
  assert n_trainable(m) == total - 3 * 3 * 3 * 64 - 47_744

  # The mask through optim.mask_frozen: frozen leaves get exactly zero updates even with weight decay
  # + momentum.
  small = {"backbone": {"conv1a": {"kernel": jnp.ones((2,))}, "bn7": {"scale": jnp.ones((2,))},
                        "b2": {"conv_branch2a": {"kernel": jnp.ones((2,))}}}}
  tx = mask_frozen(optax.chain(optax.add_decayed_weights(0.1), optax.sgd(1.0, momentum=0.9)),
                   trainable_mask(small, freeze_stem=True, freeze_bn=True))
  upd, _ = tx.update(jax.tree.map(jnp.ones_like, small), tx.init(small), small)
  np.testing.assert_array_equal(upd["backbone"]["conv1a"]["kernel"], 0.0)
  np.testing.assert_array_equal(upd["backbone"]["bn7"]["scale"], 0.0)
  np.testing.assert_allclose(upd["backbone"]["b2"]["conv_branch2a"]["kernel"], -1.1)


def test_head_and_backbone_init_like_reference():
  # PSPHead at 256 input channels, 32 head channels (PSPNet width 1/16).
  head = PSPHead(32, 2)
  p = init_variables(head, jax.random.key(0), (1, 6, 6, 256))["params"]
  seg = np.asarray(p["conv_seg"]["kernel"])
  assert seg.shape == (1, 1, 32, 2)
  np.testing.assert_allclose(seg.std(), 0.01, rtol=0.4)  # N(0, 0.01), only 64 samples
  np.testing.assert_array_equal(p["conv_seg"]["bias"], 0.0)
  # Kaiming normal fan_out: std = sqrt(2 / (k*k*out)); bottleneck is 3x3, 256+4*32 -> 32 channels.
  bott = np.asarray(p["bottleneck"]["conv"]["kernel"])
  assert bott.shape == (3, 3, 384, 32)
  np.testing.assert_allclose(bott.std(), np.sqrt(2 / (9 * 32)), rtol=0.03)
  assert np.abs(bott).max() > 3 * np.sqrt(2 / (9 * 32))  # untruncated normal (as torch.nn.init)
  np.testing.assert_allclose(np.asarray(p["ppm_6"]["conv"]["kernel"]).std(), np.sqrt(2 / 32), rtol=0.05)
  np.testing.assert_array_equal(p["bottleneck"]["bn"]["scale"], 1.0)
  np.testing.assert_array_equal(p["bottleneck"]["bn"]["bias"], 0.0)
  # Backbone conv: PyTorch default U(+-1/sqrt(fan_in)), fan_in = 3*3*in.
  from oeem_jax.models.resnet38 import conv
  k = np.asarray(conv(64, 3, name="c").init(jax.random.key(1), jnp.zeros((1, 4, 4, 32)))["params"]["kernel"])
  bound = 1 / np.sqrt(9 * 32)
  assert np.abs(k).max() <= bound + 1e-7
  np.testing.assert_allclose(k.std(), bound / np.sqrt(3), rtol=0.05)


def test_pspnet_train_mode_trains_bn_like_pytorch():
  model = PSPNet(width=TINY)
  v = host_variables(model)
  x = jnp.asarray(np.random.default_rng(1).normal(1.0, 2.0, (2, 32, 32, 3)), jnp.float32)
  (lo, aux), upd = jax.jit(lambda v, x: model.apply(v, x, train=True, rngs={"dropout": jax.random.key(2)},
                                                    mutable=["batch_stats"]))(v, x)
  assert lo.shape == aux.shape == (2, 32, 32, 2) and lo.dtype == aux.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(lo))) and np.all(np.isfinite(np.asarray(aux)))
  for path in (("decode", "bottleneck", "bn"), ("aux", "conv", "bn"), ("backbone", "bn7")):
    old, new = v["batch_stats"], upd["batch_stats"]
    for k in path:
      old, new = old[k], new[k]
    assert not np.allclose(new["mean"], old["mean"]), path  # BN trains in the segmenter

  # The first BN (b2/bn_branch2a) normalises conv1a's output: new = 0.9 * old + 0.1 * batch statistic
  # (PyTorch momentum 0.1; Flax uses the biased batch variance, PyTorch the unbiased one, here n = 2048).
  k = np.asarray(v["params"]["backbone"]["conv1a"]["kernel"], np.float64)
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  y = sum(np.einsum("nhwc,cd->nhwd", xp[:, i:i + 32, j:j + 32], k[i, j]) for i in range(3) for j in range(3))
  old = v["batch_stats"]["backbone"]["b2"]["bn_branch2a"]
  new = upd["batch_stats"]["backbone"]["b2"]["bn_branch2a"]
  np.testing.assert_allclose(np.asarray(new["mean"]), 0.9 * np.asarray(old["mean"]) + 0.1 * y.mean((0, 1, 2)),
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(new["var"]), 0.9 * np.asarray(old["var"]) + 0.1 * y.var((0, 1, 2)),
                             rtol=1e-4)


def test_bad_input_shape_error():
  with pytest.raises(ValueError, match=r"NHWC RGB"):
    jax.eval_shape(lambda: ResNet38(width=TINY).init(jax.random.key(0), jnp.zeros((1, 3, 16, 16)), train=False))


def test_import_without_torch_says_how_to_install(tmp_path, monkeypatch):
  from oeem_jax.models.import_torch import load_res38d
  ckpt = tmp_path / "res38d.pth"
  ckpt.write_bytes(b"not read")
  monkeypatch.setitem(__import__("sys").modules, "torch", None)  # `import torch` -> ImportError
  with pytest.raises(ImportError, match=r"oeem_jax\[torch\]"):
    load_res38d(ckpt, {"params": {}})
