"""PSPNet on ResNet-38d for the segmentation stage (paper §2.3, docs/reference.md §4), NHWC.

- Backbone: `ResNet38` with B7 dilation 4, BN trained (batch statistics, momentum 0.1, eps 1e-5).
- Decode head (PSPHead): adaptive average pooling of the 4096-channel map to bins 1, 2, 3, 6 with
  PyTorch's bin edges [floor(i*H/n), ceil((i+1)*H/n)) -> 1x1 conv 512 + BN + ReLU -> bilinear
  upsampling (half-pixel centres, no antialias) -> concatenate with the input (6144 channels) ->
  3x3 conv 512 + BN + ReLU -> Dropout2d(0.1) -> 1x1 conv to `num_classes` with bias.
- Auxiliary head (FCNHead) on the 1024-channel ReLU(BN) map at the entry of B6: 3x3 conv 256 + BN +
  ReLU -> Dropout2d(0.1) -> 1x1 conv to `num_classes` (its loss is weighted 0.4 by the trainer).
- Both logit maps are resized to the input size (bilinear, half-pixel centres, no antialias).
- Init as the reference (mmseg/mmcv): both final 1x1 convs ~ N(0, 0.01) with bias 0; every other
  head conv Kaiming normal (fan_out, gain sqrt(2)), no bias (BN follows); BN gamma 1, beta 0.
- Head channel counts (512, 256) scale with `width` like the backbone (`scaled_channels`).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from oeem_jax.models import efficientnet_lite
from oeem_jax.models.classifier import make_backbone
from oeem_jax.models.resnet38 import NetModule, batch_norm, conv, dropout2d, scaled_channels

PSP_BINS = (1, 2, 3, 6)
# Backbone feature under the auxiliary FCN head (see PSPNet.backbone_name).
AUX_FEATURE = {"resnet38": "b6_in", **{v: "stage5" for v in efficientnet_lite.VARIANTS}}

# mmcv kaiming_init defaults: kaiming_normal_(mode='fan_out', nonlinearity='relu'), untruncated.
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
seg_head_init = nn.initializers.normal(stddev=0.01)


def adaptive_pool_matrix(size: int, bins: int) -> np.ndarray:
  """Averaging matrix of PyTorch's AdaptiveAvgPool over one axis.

  Bin i covers [floor(i*size/bins), ceil((i+1)*size/bins)), so bins overlap when `size` is not a
  multiple of `bins` (e.g. 32 into 3 bins: [0, 11), [10, 22), [21, 32)).

  Returns:
    float32[bins, size], row i = 1/len(bin i) on bin i's pixels, 0 elsewhere.
  """
  if size < 1 or bins < 1:
    raise ValueError(f"adaptive pooling needs size >= 1 and bins >= 1, got size={size}, bins={bins}")
  m = np.zeros((bins, size), np.float32)
  for i in range(bins):
    start = (i * size) // bins
    end = -((-(i + 1) * size) // bins)  # ceil((i+1)*size/bins)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: jax.Array, bins: int) -> jax.Array:
  """PyTorch AdaptiveAvgPool2d((bins, bins)) on NHWC: x [N, H, W, C] -> [N, bins, bins, C] (x.dtype).

  Accumulates in float32.
  """
  ph = jnp.asarray(adaptive_pool_matrix(x.shape[1], bins))
  pw = jnp.asarray(adaptive_pool_matrix(x.shape[2], bins))
  y = jnp.einsum("ih,nhwc,jw->nijc", ph, x.astype(jnp.float32), pw,
                 precision=jax.lax.Precision.HIGHEST)
  return y.astype(x.dtype)


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
  """Bilinear resize with half-pixel centres, no antialias (PyTorch align_corners=False).

  x: [N, h, w, C] -> [N, height, width, C], same dtype.
  """
  n, _, _, c = x.shape
  return jax.image.resize(x, (n, height, width, c), method="bilinear", antialias=False)


class ConvBNReLU(NetModule):
  """mmcv ConvModule: conv (no bias, Kaiming normal fan_out, symmetric padding) -> BN -> ReLU."""
  features: int
  kernel: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = conv(self.features, self.kernel, name="conv", dtype=self.dtype, kernel_init=kaiming_normal_fan_out,
             impl=self.conv_impl)(x)
    return nn.relu(batch_norm(use_running_average=not train, name="bn", dtype=self.dtype)(x))


def _seg_conv(num_classes: int, name: str) -> nn.Conv:
  """Final 1x1 classifier conv with bias, N(0, 0.01) weights, computed in float32."""
  return nn.Conv(num_classes, (1, 1), use_bias=True, dtype=jnp.float32, param_dtype=jnp.float32,
                 kernel_init=seg_head_init, bias_init=nn.initializers.zeros, name=name)


class _SegHead(NetModule):
  """Base of the decode heads: `channels`-wide ConvModules, then Dropout2d(0.1) -> 1x1 `conv_seg`."""
  channels: int
  num_classes: int

  def _conv_module(self, kernel: int, name: str) -> ConvBNReLU:
    """A `channels`-wide ConvBNReLU in the head's dtype and conv_impl."""
    return ConvBNReLU(self.channels, kernel, dtype=self.dtype, conv_impl=self.conv_impl, name=name)

  def _classify(self, y: jax.Array, train: bool) -> jax.Array:
    """Dropout2d(0.1) (when training) -> `conv_seg`: [N, h, w, channels] -> float32[N, h, w, num_classes]."""
    y = dropout2d(0.1, deterministic=not train)(y)
    return _seg_conv(self.num_classes, "conv_seg")(y.astype(jnp.float32))


class PSPHead(_SegHead):
  """Pyramid pooling decode head. x: [N, h, w, C] -> float32[N, h, w, num_classes]."""
  bins: Sequence[int] = PSP_BINS

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    _, h, w, _ = x.shape
    outs = [x]
    for b in self.bins:
      p = self._conv_module(1, f"ppm_{b}")(adaptive_avg_pool(x, b), train)
      outs.append(resize_bilinear(p, h, w).astype(x.dtype))
    y = self._conv_module(3, "bottleneck")(jnp.concatenate(outs, -1), train)
    return self._classify(y, train)


class FCNHead(_SegHead):
  """Auxiliary FCN head (one 3x3 ConvModule). x: [N, h, w, C] -> float32[N, h, w, num_classes]."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return self._classify(self._conv_module(3, "conv")(x, train), train)


class PSPNet(NetModule):
  """Backbone + PSPHead + auxiliary FCNHead (docs/reference.md §4).

  Attributes:
    width: channel multiplier for the ResNet38 backbone and for both heads (1.0 = paper: heads
      512 / 256 channels); EfficientNet-Lite0's own width is fixed.
    num_classes: 2 for GlaS.
    b7_dilation: 4 in the reference segmenter (ResNet38 only).
    dtype: compute dtype (float32 or bfloat16); parameters float32, logits float32.
    backbone_name: "resnet38" (decode head on the 4096*width 'out', auxiliary head on 'b6_in',
      1024*width) or "efficientnet_lite0/1/2" (decode head on the 1280-channel head conv 'out',
      auxiliary head on 'stage5', 112 channels (Lite2 120): the last stage at the ImageNet network's stride 16, the place
      of ResNet's layer3 / ResNet38's B5 output, where mmseg's PSPNet puts its auxiliary head).
    backbone_bn_frozen: True = backbone BN on its running (e.g. ImageNet) statistics, never updated.
    conv_impl: how the convolution gradients (backbone and heads) are computed
      (`resnet38.CONV_IMPLS`; same numbers, different speed).

  Parameters: 'backbone' (ResNet38), 'decode' (PSPHead: ppm_1/2/3/6, bottleneck, conv_seg),
  'aux' (FCNHead: conv, conv_seg); BN statistics in 'batch_stats'.
  """
  width: float = 1.0
  num_classes: int = 2
  b7_dilation: int = 4
  backbone_name: str = "resnet38"
  backbone_bn_frozen: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    """Segmentation logits.

    Args:
      x: float32[N, H, W, 3] normalised image (ImageNet statistics in the reference).
      train: Dropout2d on (rng 'dropout') and batch-statistics BN updating 'batch_stats' (mutable).

    Returns:
      (logits, aux_logits): both float32[N, H, W, num_classes], bilinearly resized from stride 8.
    """
    _, height, width_px, _ = x.shape
    f = make_backbone(self.backbone_name, width=self.width, dilation=self.b7_dilation,
                      bn_frozen=self.backbone_bn_frozen, dtype=self.dtype, name="backbone",
                      conv_impl=self.conv_impl)(x, train)
    logits = PSPHead(scaled_channels(512, self.width), self.num_classes, dtype=self.dtype,
                     conv_impl=self.conv_impl, name="decode")(f["out"], train)
    aux = FCNHead(scaled_channels(256, self.width), self.num_classes, dtype=self.dtype,
                  conv_impl=self.conv_impl, name="aux")(f[AUX_FEATURE[self.backbone_name]], train)
    return resize_bilinear(logits, height, width_px), resize_bilinear(aux, height, width_px)
