"""Patch classifier with class activation maps (paper Eq. 1-2, docs/reference.md §2 "Feature fusion"/"Head").

Three stride-8 ResNet38 features (ReLU(BN) at the entry of B5 and of B6, and ReLU(bn7(B7))) are
concatenated (512 + 1024 + 4096 = 5632 channels at width 1), globally average pooled and mapped by one
linear layer with bias to the class logits. Because the head is linear, the CAM of class c at pixel p
is the same map applied per pixel, and the global average of the CAM equals the logits.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from oeem_jax.models import efficientnet_lite
from oeem_jax.models.resnet38 import BNNetModule, ResNet38, scaled_channels, torch_default_init

BACKBONES = ("resnet38",) + efficientnet_lite.VARIANTS

# Fused features per backbone (paper Eq. 1: several stages before the linear layer).
FEATURE_KEYS = {"resnet38": ("b5_in", "b6_in", "out"),
                **{v: ("stage5", "stage6", "out") for v in efficientnet_lite.VARIANTS}}


def check_backbone(name: str) -> str:
  """Returns `name` if it is a known backbone; raises ValueError naming the config key otherwise."""
  if name not in BACKBONES:
    raise ValueError(f"config key model.backbone is {name!r}; expected one of {', '.join(BACKBONES)}")
  return name


def feature_channels(backbone: str, width: float) -> int:
  """Channels of the fused classifier features: 5632*width (ResNet38) or 1584 (EfficientNet-Lite0
  and Lite1, 112 + 192 + 1280; Lite2 1608 = 120 + 208 + 1280; the width is fixed by the weights)."""
  if check_backbone(backbone) == "resnet38":
    return sum(scaled_channels(c, width) for c in (512, 1024, 4096))
  channels = efficientnet_lite.feature_channels(backbone)
  return sum(channels[k] for k in FEATURE_KEYS[backbone])


def make_backbone(backbone: str, *, width: float, dilation: int, bn_frozen: bool, dtype: Any,
                  name: str | None = None, conv_impl: str = "auto") -> nn.Module:
  """The stride-8 feature extractor: ResNet38 (B7 dilation `dilation`) or EfficientNet-Lite0/1/2
  (output stride 8 by dilation; `width` and `dilation` do not apply). `conv_impl`: how the
  convolutions' gradients are computed (`resnet38.CONV_IMPLS`).

  Raises:
    ValueError: an unknown `backbone`.
  """
  if check_backbone(backbone) == "resnet38":
    return ResNet38(width=width, b7_dilation=dilation, bn_frozen=bn_frozen, dtype=dtype,
                    conv_impl=conv_impl, name=name)
  return efficientnet_lite.EfficientNetLite(output_stride=8, variant=backbone, bn_frozen=bn_frozen, dtype=dtype,
                                            conv_impl=conv_impl, name=name)


def _torch_linear_bias_init(fan_in: int):
  """PyTorch nn.Linear default bias init: U(+-1/sqrt(fan_in))."""
  bound = 1.0 / float(fan_in) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class CAMClassifier(BNNetModule):
  """Backbone + GAP + Linear(C_feat -> num_classes, bias); `cam` applies the linear map per pixel.

  C_feat = 5632*width for ResNet38 (b5_in, b6_in, out), 1584 for EfficientNet-Lite0 (outputs of
  stages 5 and 6 and of the head conv, all at stride 8): `feature_channels`.

  Attributes:
    width: ResNet38 channel multiplier (1.0 = paper); EfficientNet-Lite0 has a fixed width.
    num_classes: 2 for GlaS, ordered [non-gland, gland].
    b7_dilation: 2 as in the reference classifier.
    bn_frozen: True when starting from ImageNet weights (reference): BN always uses running statistics.
      Pair it with `trainable_mask(..., freeze_stem=True, freeze_bn=True)` in the optimizer.
    dtype: backbone compute dtype; the head (pooling and linear map) always runs in float32.
    backbone_name: "resnet38" (paper) or "efficientnet_lite0/1/2" (`BACKBONES`; config key
      model.backbone).
    conv_impl: how the backbone's convolution gradients are computed (`resnet38.CONV_IMPLS`; same
      numbers, different speed).

  Parameters: 'backbone' (ResNet38 tree), 'fc' ({'kernel': [C_feat, num_classes], 'bias': [num_classes]}),
  initialised like PyTorch's nn.Linear default.
  """
  width: float = 1.0
  num_classes: int = 2
  b7_dilation: int = 2
  backbone_name: str = "resnet38"

  def setup(self):
    self.backbone = make_backbone(self.backbone_name, width=self.width, dilation=self.b7_dilation,
                                  bn_frozen=self.bn_frozen, dtype=self.dtype,
                                  conv_impl=self.conv_impl)
    # Feature channels are known statically from the width.
    fan_in = feature_channels(self.backbone_name, self.width)
    self.fc = nn.Dense(self.num_classes, use_bias=True, dtype=jnp.float32, param_dtype=jnp.float32,
                       kernel_init=torch_default_init, bias_init=_torch_linear_bias_init(fan_in))

  def features(self, x: jax.Array, train: bool) -> jax.Array:
    """x: float32[N, H, W, 3] -> float32[N, h, w, C_feat] (concatenated stride-8 features)."""
    f = self.backbone(x, train)
    return jnp.concatenate([f[k].astype(jnp.float32) for k in FEATURE_KEYS[self.backbone_name]], axis=-1)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Image-level class logits.

    Args:
      x: float32[N, H, W, 3] normalised tiles (reference: 224x224, classification statistics).
      train: dropout on (rng 'dropout'); batch-statistics BN unless `bn_frozen`.

    Returns:
      float32[N, num_classes] logits (pre-sigmoid; the reference trains them with BCE-with-logits).
    """
    f = self.backbone(x, train)
    # GAP per feature then concatenate == GAP of the concatenation (cheaper, same numbers).
    pooled = jnp.concatenate(
        [jnp.mean(f[k].astype(jnp.float32), axis=(1, 2)) for k in FEATURE_KEYS[self.backbone_name]], axis=-1)
    return self.fc(pooled)

  def cam(self, x: jax.Array) -> jax.Array:
    """Class activation maps in eval mode (paper Eq. 2, docs/reference.md §3 step 2).

    Args:
      x: float32[N, H, W, 3] normalised tiles.

    Returns:
      float32[N, h, w, num_classes], h = feature_size(H): the linear head applied per pixel, raw scores
      including the bias (no ReLU, no normalisation). mean over (h, w) equals `__call__(x, False)`.
    """
    return self.fc(self.features(x, train=False))
