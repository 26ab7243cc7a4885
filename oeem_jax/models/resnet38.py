"""ResNet-38d ("resnet38d" of Wu et al. 2019, as used by SEAM and OEEM), NHWC, flax.linen.

Implements docs/reference.md §2 (the backbone of both stages):

- `conv1a`: 3x3 conv 3->64, stride 1, no BN/ReLU after it.
- Pre-activation basic blocks (`BasicBlock`) B2 (3 blocks, 64->128, first stride 2), B3 (3, ->256,
  stride 2), B4 (6, ->512, stride 2), B5 (3, 512->1024 with mid 512, dilation 2; first block's first
  conv dilation 1).
- Pre-activation bottlenecks (`BottleneckBlock`) B6 (1024->2048, dilation 4, Dropout2d 0.3) and B7
  (2048->4096, dilation `b7_dilation`: 2 in the classifier, 4 in the segmenter, Dropout2d 0.5).
- `bn7` + ReLU after B7. Output stride 8.

Conventions (all checked by tests/test_models.py and tests/test_torch_parity.py):

- Convolutions have no bias; a 3x3 conv with dilation d is padded symmetrically by (d, d) exactly as
  PyTorch's `padding=d` (never Flax "SAME", which pads (0, 1) for stride 2 on even inputs). Spatial
  size after a stride-2 stage is ceil(H/2): 112 -> 14, 113 -> 15, 224 -> 28, 256 -> 32 at stride 8.
- Module names follow the reference (SEAM/OEEM resnet38d) state-dict convention so that
  `import_torch.load_res38d` can map `res38d.pth` one to one: `conv1a`, `b2`, `b2_1`, `b2_2`, `b3`, ...,
  `b4_5`, `b5`, `b5_1`, `b5_2`, `b6`, `b7`, `bn7`; inside a block `bn_branch2a`, `conv_branch2a`,
  `bn_branch2b1`, `conv_branch2b1`, (bottleneck only) `bn_branch2b2`, `conv_branch2b2`, and the
  projection shortcut `conv_branch1`.
- BatchNorm: PyTorch momentum 0.1 == Flax momentum 0.9, eps 1e-5; parameters `scale`/`bias` in
  'params', running `mean`/`var` in 'batch_stats'. One difference remains: PyTorch updates the running
  variance with the unbiased batch variance (factor n/(n-1), n = N*H*W >= 2048 for the segmenter's
  batches, i.e. <= 0.05 %), Flax with the biased one; eval-mode outputs are identical.
  `bn_frozen=True` uses the running statistics even when `train=True` and never updates them (the
  reference classifier keeps every BN in eval mode); freezing gamma/beta and `conv1a` is done by the
  optimizer (`oeem_jax.models.trainable_mask`).
- Width multiplier: every channel count c of the paper's network becomes `max(1, round(c * width))`
  (`scaled_channels`); width 1.0 is the paper's network (105,070,912 trainable parameters counting
  BN scale/bias, plus 47,744 BN running statistics). Widths 0.25 and 0.125 keep every count a multiple
  of 8.
- Initialisation (training from scratch): PyTorch's default conv init, U(+-1/sqrt(fan_in)) (i.e.
  kaiming_uniform with a=sqrt(5)); BN gamma 1, beta 0. The reference always starts from the ImageNet
  `res38d.pth` instead (see `import_torch`).
- `dtype` is the compute dtype (e.g. jnp.bfloat16); parameters are always float32 (fp32 master
  weights) and BN statistics are reduced in float32.
- Speed on CPU: convolutions go through `conv2d`, which on the CPU backend computes 1x1 convs as
  matmuls and the weight gradient of kxk convs as one im2col matmul (XLA:CPU's own weight-gradient
  convolution is 3-10x slower than its forward pass); same numbers, see `CONV_IMPLS` and the
  `conv_impl` attribute of the networks.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import kw_only_dataclasses

# PyTorch's default Conv2d/Linear weight init: kaiming_uniform_(a=sqrt(5)) == U(+-1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

BN_MOMENTUM = 0.9  # == PyTorch momentum 0.1
BN_EPS = 1e-5

# Output stride of the backbone (input size -> ceil(ceil(ceil(H/2)/2)/2)).
OUTPUT_STRIDE = 8


def scaled_channels(c: int, width: float) -> int:
  """Channel count of the paper's `c` at width multiplier `width`: max(1, round(c * width))."""
  if width <= 0:
    raise ValueError(f"width must be > 0, got {width}")
  return max(1, int(round(c * width)))


def feature_size(size: int) -> int:
  """Backbone output size (stride 8) for an input side of `size` pixels, as PyTorch computes it."""
  for _ in range(3):
    size = (size - 1) // 2 + 1  # 3x3, pad 1, stride 2 (and 1x1, pad 0, stride 2)
  return size


# How convolutions are differentiated (the `conv_impl` attribute of the networks, `conv2d`'s `impl`):
#   'xla'  - plain lax.conv_general_dilated and XLA's own gradients;
#   'dots' - 1x1 convs as a matmul (einsum); kxk convs keep XLA's forward and input gradient but
#            compute the weight gradient as one im2col matmul (see `conv2d`);
#   'auto' - on the CPU backend 'dots' for convs with Cin*Cout >= DOTS_MIN_CHANNEL_PRODUCT (XLA:CPU's
#            weight-gradient convolution runs at ~10-20 GFLOP/s on 2 cores, 3-10x below its forward,
#            for these wide layers; narrow ones gain nothing), 'xla' for the rest and on GPU/TPU.
CONV_IMPLS = ("auto", "xla", "dots")
DOTS_MIN_CHANNEL_PRODUCT = 256 * 256


def check_conv_impl(impl: str) -> str:
  """`impl` when it is one of `CONV_IMPLS`.

  Raises:
    ValueError: any other value.
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv impl must be 'auto', 'xla' or 'dots', got {impl!r}")
  return impl


def _use_dots(cin: int, cout: int, impl: str) -> bool:
  if check_conv_impl(impl) == "auto":
    return jax.default_backend() == "cpu" and cin * cout >= DOTS_MIN_CHANNEL_PRODUCT
  return impl == "dots"


def _lax_conv(x, k, stride: int, dilation: int):
  pad = dilation * (k.shape[0] - 1) // 2
  return jax.lax.conv_general_dilated(x, k, (stride, stride), ((pad, pad), (pad, pad)),
                                      rhs_dilation=(dilation, dilation),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _im2col(x, kh: int, kw: int, out_h: int, out_w: int, stride: int, dilation: int):
  """[N, H, W, C] -> [N, out_h, out_w, kh*kw*C], taps in (i, j) row-major order then channels."""
  ph, pw = dilation * (kh - 1) // 2, dilation * (kw - 1) // 2
  xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  n, c = x.shape[0], x.shape[3]
  taps = [jax.lax.slice(xp, (0, i * dilation, j * dilation, 0),
                        (n, i * dilation + stride * (out_h - 1) + 1, j * dilation + stride * (out_w - 1) + 1, c),
                        (1, stride, stride, 1))
          for i in range(kh) for j in range(kw)]
  return jnp.concatenate(taps, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_wgrad_dot(x, k, stride: int, dilation: int):
  return _lax_conv(x, k, stride, dilation)


def _conv_fwd(x, k, stride, dilation):
  return _lax_conv(x, k, stride, dilation), (x, k)


def _conv_bwd(stride, dilation, res, g):
  x, k = res
  _, vjp_x = jax.vjp(lambda x_: _lax_conv(x_, k, stride, dilation), x)
  (dx,) = vjp_x(g)
  kh, kw, cin, cout = k.shape
  col = _im2col(x, kh, kw, g.shape[1], g.shape[2], stride, dilation)
  dk = jnp.einsum("nhwk,nhwd->kd", col, g, preferred_element_type=jnp.float32)
  return dx, dk.reshape(kh, kw, cin, cout).astype(k.dtype)


_conv_wgrad_dot.defvjp(_conv_fwd, _conv_bwd)


def conv2d(x: jax.Array, k: jax.Array, stride: int = 1, dilation: int = 1,
           impl: str = "auto") -> jax.Array:
  """Bias-free NHWC conv with PyTorch's symmetric padding p = dilation*(k-1)/2 (odd square kernels).

  x: [N, H, W, Cin], k: [kh, kw, Cin, Cout] (HWIO) -> [N, (H-1)//stride+1, (W-1)//stride+1, Cout].
  `impl` (one of `CONV_IMPLS`) picks how the gradients are computed; the math is identical for
  every choice.

  Raises:
    ValueError: a kernel that is not odd and square, or an unknown `impl`.
  """
  if k.shape[0] != k.shape[1] or k.shape[0] % 2 != 1:
    raise ValueError(f"conv2d expects an odd square kernel, got {k.shape}")
  if not _use_dots(k.shape[2], k.shape[3], impl):
    return _lax_conv(x, k, stride, dilation)
  if k.shape[0] == 1:
    if stride > 1:
      x = x[:, ::stride, ::stride, :]
    return jnp.einsum("nhwc,cd->nhwd", x, k[0, 0])
  return _conv_wgrad_dot(x, k, stride, dilation)


class Conv2d(nn.Module):
  """Bias-free conv (param 'kernel' HWIO, float32) computed in `dtype` by `conv2d` (`impl`)."""
  features: int
  kernel: int
  stride: int = 1
  dilation: int = 1
  dtype: Any = jnp.float32
  kernel_init: Any = torch_default_init
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.param("kernel", self.kernel_init, (self.kernel, self.kernel, x.shape[-1], self.features),
                   jnp.float32)
    return conv2d(x.astype(self.dtype), k.astype(self.dtype), self.stride, self.dilation, self.impl)


def conv(features: int, kernel: int, *, stride: int = 1, dilation: int = 1, name: str,
         dtype: Any = jnp.float32, kernel_init=torch_default_init, impl: str = "auto") -> Conv2d:
  """A bias-free conv with PyTorch's symmetric padding ((p, p), (p, p)), p = dilation*(kernel-1)/2."""
  return Conv2d(features, kernel, stride=stride, dilation=dilation, dtype=dtype, kernel_init=kernel_init,
                impl=impl, name=name)


def batch_norm(*, use_running_average: bool, name: str, dtype: Any = jnp.float32) -> nn.BatchNorm:
  """PyTorch-equivalent BatchNorm2d over the channel (last) axis: momentum 0.1, eps 1e-5."""
  return nn.BatchNorm(use_running_average=use_running_average, momentum=BN_MOMENTUM, epsilon=BN_EPS,
                      dtype=dtype, param_dtype=jnp.float32, name=name)


def dropout2d(rate: float, *, deterministic: bool) -> nn.Dropout:
  """Channel dropout (PyTorch Dropout2d) on NHWC: one Bernoulli draw per (sample, channel)."""
  return nn.Dropout(rate, broadcast_dims=(1, 2), deterministic=deterministic, rng_collection="dropout")


def _kw_only(default: Any) -> Any:
  """A keyword-only module field: flax puts it behind the subclass's own (maybe required) fields."""
  return kw_only_dataclasses.field(default=default, kw_only=True)


class NetModule(nn.Module):
  """Base of the networks' modules: the compute settings a module hands down to its submodules.

  The fields are keyword-only, so a subclass declares its own positional fields (with or without
  defaults) as usual, and callers always pass these by name.

  Attributes:
    dtype: compute dtype (float32 or bfloat16); parameters stay float32.
    conv_impl: how the convolutions' gradients are computed, one of `CONV_IMPLS` (same numbers).
  """
  dtype: Any = _kw_only(jnp.float32)
  conv_impl: str = _kw_only("auto")


class BNNetModule(NetModule):
  """`NetModule` with BatchNorm layers that can be frozen.

  Attributes:
    bn_frozen: True = every BN uses its running statistics and never updates them, even when
      `train=True`; False = batch statistics (and updated running averages) when training.
  """
  bn_frozen: bool = _kw_only(False)

  def use_running_average(self, train: bool) -> bool:
    """Whether the BN layers normalise with their running statistics: when frozen or not training."""
    return self.bn_frozen or not train

  def shared_kwargs(self) -> dict[str, Any]:
    """bn_frozen, dtype and conv_impl as keyword arguments, to hand them to a submodule."""
    return dict(bn_frozen=self.bn_frozen, dtype=self.dtype, conv_impl=self.conv_impl)


class _ResNetModule(BNNetModule):
  """Base of ResNet38 and its blocks: convs and BN -> ReLU in the module's dtype, conv_impl, BN mode."""

  def _conv(self, features: int, kernel: int, *, name: str, stride: int = 1, dilation: int = 1) -> Conv2d:
    """`conv` (bias-free, PyTorch padding) computed in this module's dtype with its conv_impl."""
    return conv(features, kernel, stride=stride, dilation=dilation, name=name, dtype=self.dtype,
                impl=self.conv_impl)

  def _bn_relu(self, x: jax.Array, train: bool, name: str) -> jax.Array:
    """ReLU(BN(x)), BN named `name` (running statistics when `use_running_average(train)`)."""
    bn = batch_norm(use_running_average=self.use_running_average(train), name=name, dtype=self.dtype)
    return nn.relu(bn(x))


class BasicBlock(_ResNetModule):
  """Pre-activation basic block (docs/reference.md §2 "Basic block (in, mid, out, s, d1, d)").

  a = ReLU(BN(x)); shortcut = x if in == out and stride 1 else 1x1 stride-s conv of a;
  main = conv3x3(mid, stride s, dilation d1) -> BN -> ReLU -> conv3x3(out, dilation d); y = shortcut + main.
  """
  mid: int
  out: int
  stride: int = 1
  first_dilation: int = 1
  dilation: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    """x: [N, H, W, in] -> (y [N, H', W', out], a = ReLU(BN(x)) [N, H, W, in])."""
    a = self._bn_relu(x, train, "bn_branch2a")
    if x.shape[-1] == self.out and self.stride == 1:
      shortcut = x
    else:
      shortcut = self._conv(self.out, 1, stride=self.stride, name="conv_branch1")(a)
    h = self._conv(self.mid, 3, stride=self.stride, dilation=self.first_dilation, name="conv_branch2a")(a)
    h = self._bn_relu(h, train, "bn_branch2b1")
    h = self._conv(self.out, 3, dilation=self.dilation, name="conv_branch2b1")(h)
    return shortcut + h, a


class BottleneckBlock(_ResNetModule):
  """Pre-activation bottleneck (docs/reference.md §2 "Bottleneck block (in, out, d, p)").

  a = ReLU(BN(x)); shortcut = conv1x1(out)(a); main = conv1x1(out/4) -> BN -> ReLU -> Dropout2d(p)
  -> conv3x3(out/2, dilation d) -> BN -> ReLU -> Dropout2d(p) -> conv1x1(out); y = shortcut + main.
  `out4`/`out2` are the (width-scaled) out/4 and out/2 channel counts.
  """
  out: int
  out4: int
  out2: int
  dilation: int
  dropout: float

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    """x: [N, H, W, in] -> (y [N, H, W, out], a = ReLU(BN(x)) [N, H, W, in])."""
    a = self._bn_relu(x, train, "bn_branch2a")
    shortcut = self._conv(self.out, 1, name="conv_branch1")(a)
    h = self._conv(self.out4, 1, name="conv_branch2a")(a)
    h = dropout2d(self.dropout, deterministic=not train)(self._bn_relu(h, train, "bn_branch2b1"))
    h = self._conv(self.out2, 3, dilation=self.dilation, name="conv_branch2b1")(h)
    h = dropout2d(self.dropout, deterministic=not train)(self._bn_relu(h, train, "bn_branch2b2"))
    h = self._conv(self.out, 1, name="conv_branch2b2")(h)
    return shortcut + h, a


class ResNet38(_ResNetModule):
  """ResNet-38d backbone (docs/reference.md §2), output stride 8.

  Attributes:
    width: channel multiplier (1.0 = the paper's network); see `scaled_channels`.
    b7_dilation: dilation of B7's 3x3 conv (2 in the reference classifier, 4 in the segmenter).
    bn_frozen: True = every BN uses its running statistics and never updates them, even when
      `train=True` (reference classifier); False = batch statistics when training (segmenter).
    dtype: compute dtype (float32 or bfloat16); parameters stay float32.
    conv_impl: how the convolutions' gradients are computed, one of `CONV_IMPLS` (same numbers).
  """
  width: float = 1.0
  b7_dilation: int = 2

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    """Runs the backbone.

    Args:
      x: float32[N, H, W, 3], normalised image (any H, W >= 1).
      train: enables Dropout2d (rng 'dropout') and, unless `bn_frozen`, batch-statistics BN whose
        running averages are updated in the mutable collection 'batch_stats'.

    Returns:
      dict of `dtype` arrays, all at stride 8 (h = feature_size(H), w = feature_size(W)):
        'b5_in': [N, h, w, 512*width]  ReLU(BN(x)) at the entry of B5;
        'b6_in': [N, h, w, 1024*width] ReLU(BN(x)) at the entry of B6;
        'out':   [N, h, w, 4096*width] ReLU(bn7(B7 output)).
    """
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"ResNet38 expects NHWC RGB input [N, H, W, 3], got shape {x.shape}")
    ch = lambda c: scaled_channels(c, self.width)  # noqa: E731
    kw = self.shared_kwargs()
    x = x.astype(self.dtype)
    x = self._conv(ch(64), 3, name="conv1a")(x)
    x, _ = BasicBlock(ch(128), ch(128), stride=2, name="b2", **kw)(x, train)
    x, _ = BasicBlock(ch(128), ch(128), name="b2_1", **kw)(x, train)
    x, _ = BasicBlock(ch(128), ch(128), name="b2_2", **kw)(x, train)
    x, _ = BasicBlock(ch(256), ch(256), stride=2, name="b3", **kw)(x, train)
    x, _ = BasicBlock(ch(256), ch(256), name="b3_1", **kw)(x, train)
    x, _ = BasicBlock(ch(256), ch(256), name="b3_2", **kw)(x, train)
    x, _ = BasicBlock(ch(512), ch(512), stride=2, name="b4", **kw)(x, train)
    for i in range(1, 6):
      x, _ = BasicBlock(ch(512), ch(512), name=f"b4_{i}", **kw)(x, train)
    x, b5_in = BasicBlock(ch(512), ch(1024), first_dilation=1, dilation=2, name="b5", **kw)(x, train)
    x, _ = BasicBlock(ch(512), ch(1024), first_dilation=2, dilation=2, name="b5_1", **kw)(x, train)
    x, _ = BasicBlock(ch(512), ch(1024), first_dilation=2, dilation=2, name="b5_2", **kw)(x, train)
    x, b6_in = BottleneckBlock(ch(2048), ch(512), ch(1024), dilation=4, dropout=0.3, name="b6",
                               **kw)(x, train)
    x, _ = BottleneckBlock(ch(4096), ch(1024), ch(2048), dilation=self.b7_dilation, dropout=0.5,
                           name="b7", **kw)(x, train)
    return {"b5_in": b5_in, "b6_in": b6_in, "out": self._bn_relu(x, train, "bn7")}
