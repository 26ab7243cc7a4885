"""Patch classifier with class activation maps (paper Eq. 1-2, REFERENCE.md §2 "Feature fusion"/"Head").

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

from oeem_jax.models.resnet38 import ResNet38, scaled_channels, torch_default_init

FEATURE_KEYS = ("b5_in", "b6_in", "out")


def _torch_linear_bias_init(fan_in: int):
  """PyTorch nn.Linear default bias init: U(+-1/sqrt(fan_in))."""
  bound = 1.0 / float(fan_in) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class CAMClassifier(nn.Module):
  """ResNet38 + GAP + Linear(5632*width -> num_classes, bias); `cam` applies the linear map per pixel.

  Attributes:
    width: backbone channel multiplier (1.0 = paper).
    num_classes: 2 for GlaS, ordered [non-gland, gland].
    b7_dilation: 2 as in the reference classifier.
    bn_frozen: True when starting from ImageNet weights (reference): BN always uses running statistics.
      Pair it with `trainable_mask(..., freeze_stem=True, freeze_bn=True)` in the optimizer.
    dtype: backbone compute dtype; the head (pooling and linear map) always runs in float32.

  Parameters: 'backbone' (ResNet38 tree), 'fc' ({'kernel': [C_feat, num_classes], 'bias': [num_classes]}),
  initialised like PyTorch's nn.Linear default.
  """
  width: float = 1.0
  num_classes: int = 2
  b7_dilation: int = 2
  bn_frozen: bool = False
  dtype: Any = jnp.float32

  def setup(self):
    self.backbone = ResNet38(width=self.width, b7_dilation=self.b7_dilation, bn_frozen=self.bn_frozen,
                             dtype=self.dtype)
    # Feature channels are known statically from the width.
    fan_in = sum(scaled_channels(c, self.width) for c in (512, 1024, 4096))
    self.fc = nn.Dense(self.num_classes, use_bias=True, dtype=jnp.float32, param_dtype=jnp.float32,
                       kernel_init=torch_default_init, bias_init=_torch_linear_bias_init(fan_in))

  def features(self, x: jax.Array, train: bool) -> jax.Array:
    """x: float32[N, H, W, 3] -> float32[N, h, w, C_feat] (concatenated stride-8 features)."""
    f = self.backbone(x, train)
    return jnp.concatenate([f[k].astype(jnp.float32) for k in FEATURE_KEYS], axis=-1)

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
        [jnp.mean(f[k].astype(jnp.float32), axis=(1, 2)) for k in FEATURE_KEYS], axis=-1)
    return self.fc(pooled)

  def cam(self, x: jax.Array) -> jax.Array:
    """Class activation maps in eval mode (paper Eq. 2, REFERENCE.md §3 step 2).

    Args:
      x: float32[N, H, W, 3] normalised tiles.

    Returns:
      float32[N, h, w, num_classes], h = feature_size(H): the linear head applied per pixel, raw scores
      including the bias (no ReLU, no normalisation). mean over (h, w) equals `__call__(x, False)`.
    """
    return self.fc(self.features(x, train=False))
