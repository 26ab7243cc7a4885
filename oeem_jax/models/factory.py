"""The networks of the two training stages built from a config, in one place.

`make_classifier` (stage cls) and `make_segmenter` (stage seg) read the same keys: `model.width`, `model.dtype`, `model.backbone`, `model.bn` and the stage section
(`cls.num_classes` / `cls.b7_dilation`, `seg.num_classes` / `seg.b7_dilation`).

A training stage writes its network's constructor arguments beside its checkpoints (`network_card`,
saved as `WORKDIR/<stage>/network.json` by `oeem_jax.runtime.artifacts`), and `network_from_card` rebuilds
exactly that module from them (`oeem_jax.models.network.trained_network`): the later stages need no config
of the training run.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Mapping

from oeem_jax.config.check import BN_MODES
from oeem_jax.errors import ConfigError

if TYPE_CHECKING:  # annotations only
  import ml_collections
  import numpy as np

  from oeem_jax.models.classifier import CAMClassifier
  from oeem_jax.models.pspnet import PSPNet

# Defaults of the stage sections when a config lacks them (the original OEEM code's values).
CLS_B7_DILATION = 2
SEG_B7_DILATION = 4
NUM_CLASSES = 2


def bn_frozen(config: ml_collections.ConfigDict, stage: str) -> bool:
  """Whether the backbone's BN stays on its running statistics (and gamma/beta are frozen).

  `model.bn`: "auto" = frozen in the classifier when it starts from ImageNet weights (the reference),
  trained otherwise and always in the segmenter; "frozen" / "train" = that, in both stages.

  Args:
    config: a stage config with a `model` section.
    stage: "cls" or "seg".

  Raises:
    errors.ConfigError (a ValueError): another value of `model.bn`.
  """
  mode = str(config.model.get("bn", "auto"))
  if mode not in BN_MODES:
    raise ConfigError("model.bn", repr(mode), "one of " + ", ".join(BN_MODES))
  if mode == "auto":
    return stage == "cls" and bool(config.model.get("init_checkpoint", ""))
  return mode == "frozen"


def _dtype(config: ml_collections.ConfigDict):
  import jax.numpy as jnp
  return jnp.dtype(config.model.get("dtype", "float32"))


def make_classifier(config: ml_collections.ConfigDict, *, frozen_bn: bool | None = None
                    ) -> CAMClassifier:
  """The patch classifier (`CAMClassifier`) of `config.model` / `config.cls`.

  Missing `cls` keys take the defaults (2 classes, B7 dilation 2).

  Args:
    config: a config with a `model` section (width, dtype, backbone, bn) and optionally `cls`.
    frozen_bn: BN on running statistics; None = `bn_frozen(config, "cls")` (config key model.bn).

  Raises:
    errors.ConfigError: a bad `model.bn`; a bad `model.dtype` raises TypeError (numpy).
  """
  from oeem_jax.models.classifier import CAMClassifier
  frozen = bn_frozen(config, "cls") if frozen_bn is None else frozen_bn
  cls_cfg = config.get("cls", {})
  return CAMClassifier(width=float(config.model.width),
                       num_classes=int(cls_cfg.get("num_classes", NUM_CLASSES)),
                       b7_dilation=int(cls_cfg.get("b7_dilation", CLS_B7_DILATION)),
                       bn_frozen=frozen, dtype=_dtype(config),
                       backbone_name=str(config.model.get("backbone", "resnet38")))


def make_segmenter(config: ml_collections.ConfigDict) -> PSPNet:
  """The segmenter (`PSPNet`) of `config.model` / `config.seg`.

  Missing `seg` keys take the defaults (2 classes, B7 dilation 4). The backbone's BN follows
  `bn_frozen(config, "seg")`.

  Raises:
    errors.ConfigError: a bad `model.bn`; a bad `model.dtype` raises TypeError (numpy).
  """
  from oeem_jax.models.pspnet import PSPNet
  seg_cfg = config.get("seg", {})
  return PSPNet(width=float(config.model.width),
                num_classes=int(seg_cfg.get("num_classes", NUM_CLASSES)),
                b7_dilation=int(seg_cfg.get("b7_dilation", SEG_B7_DILATION)),
                dtype=_dtype(config), backbone_name=str(config.model.get("backbone", "resnet38")),
                backbone_bn_frozen=bn_frozen(config, "seg"))


def segmenter_apply_fn(model: Any, variables: dict[str, Any]
                       ) -> Callable[[np.ndarray], np.ndarray]:
  """A jitted eval-mode logits function of a segmenter: float32[B, h, w, 3] -> float32[B, h, w, C].

  The variables ({"params", "batch_stats"}) are closed over as device arrays; jit caches one
  executable per input shape, and `oeem_jax.evaluation.inference` only ever feeds one shape. Input and output
  are NumPy arrays.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  variables = jax.device_put(variables)

  @jax.jit
  def apply(x):
    logits, _ = model.apply(variables, x, train=False)
    return logits.astype(jnp.float32)

  return lambda x: np.asarray(apply(jnp.asarray(x)))


# `network_card` format: what the card's "network" names -> the module class (imported lazily).
CARD_FORMAT = "oeem_jax-network/1"
_NETWORK_CLASSES = {"CAMClassifier": ("oeem_jax.models.classifier", "CAMClassifier"),
                    "PSPNet": ("oeem_jax.models.pspnet", "PSPNet")}


def network_card(model: Any, *, input_kind: str, input_stats: Any, input_size: int) -> dict[str, Any]:
  """The JSON description of a trained network: its class, its constructor arguments and its input.

  Args:
    model: a `CAMClassifier` or `PSPNet` (an unbound flax module).
    input_kind: "cls" or "seg": the `models.network.normalize` kind the network was trained with.
    input_stats: (mean, std) on 0..255 RGB replacing that kind's default (`network.config_input_stats`), or
      None.
    input_size: side in pixels of the training inputs (cls: tile input size, seg: crop size); the
      cam stage feeds CAM tiles at this size.

  Returns:
    {"format": CARD_FORMAT, "network": class name, "kwargs": {field: JSON value} (dtype as its
    NumPy name, e.g. "float32"), "input": {"kind", "stats", "size"}}.

  Raises:
    ValueError: a module of another class than those `network_from_card` rebuilds.
  """
  import numpy as np

  name = type(model).__name__
  if name not in _NETWORK_CLASSES:
    raise ValueError(f"network_card: cannot describe a {name}; expected one of {sorted(_NETWORK_CLASSES)}")
  kwargs = {}
  for f in dataclasses.fields(model):
    if f.name in ("parent", "name") or not f.init:
      continue
    value = getattr(model, f.name)
    kwargs[f.name] = np.dtype(value).name if f.name == "dtype" else value
  stats = None if input_stats is None else [[float(v) for v in s] for s in input_stats]
  return {"format": CARD_FORMAT, "network": name, "kwargs": kwargs,
          "input": {"kind": str(input_kind), "stats": stats, "size": int(input_size)}}


def network_from_card(card: Mapping[str, Any]) -> Any:
  """The flax module a `network_card` describes (the same class and constructor arguments).

  Raises:
    ValueError: another card format, an unknown network class, or arguments the class does not take
      (the message names them).
  """
  import importlib

  import jax.numpy as jnp

  if card.get("format") != CARD_FORMAT:
    raise ValueError(f"network card format {card.get('format')!r}; expected {CARD_FORMAT!r}")
  name = card.get("network")
  if name not in _NETWORK_CLASSES:
    raise ValueError(f"network card names {name!r}; expected one of {sorted(_NETWORK_CLASSES)}")
  module, cls_name = _NETWORK_CLASSES[name]
  cls = getattr(importlib.import_module(module), cls_name)
  kwargs = dict(card.get("kwargs", {}))
  known = {f.name for f in dataclasses.fields(cls) if f.init} - {"parent", "name"}
  unknown = sorted(set(kwargs) - known)
  if unknown:
    raise ValueError(f"network card: {name} takes no argument(s) {unknown}; it takes {sorted(known)}")
  if "dtype" in kwargs:
    kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
  return cls(**kwargs)
