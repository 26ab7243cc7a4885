"""Import the reference's ImageNet ResNet-38d weights (`res38d.pth`) into Flax variables.

The reference (REFERENCE.md §2 "Initialisation", §4 "Backbone") starts both stages from
`res38d.pth`, a PyTorch state dict converted by SEAM from MXNet `ilsvrc-cls_rna-a1_cls1000_ep-0001.params`,
loaded non-strictly (head layers keep their random init). Its keys follow the resnet38d naming that
`oeem_jax.models.resnet38` mirrors, e.g.

    conv1a.weight                      -> params  conv1a/kernel            (OIHW -> HWIO)
    b2_1.bn_branch2a.weight / .bias    -> params  b2_1/bn_branch2a/scale / bias
    b2_1.bn_branch2a.running_mean/var  -> batch_stats b2_1/bn_branch2a/mean / var
    b7.conv_branch2b2.weight           -> params  b7/conv_branch2b2/kernel
    bn7.*                              -> bn7/*

`*.num_batches_tracked` has no Flax counterpart and is skipped. torch is needed only to read the file
(`pip install 'oeem_jax[torch]'`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

_BN_MAP = {"weight": ("params", "scale"), "bias": ("params", "bias"),
           "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def _import_torch():
  try:
    import torch  # noqa: PLC0415
  except ImportError as e:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "reading a PyTorch checkpoint (res38d.pth) needs torch: pip install 'oeem_jax[torch]' "
        "(torch==2.13.0, CPU build is enough)") from e
  return torch


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a PyTorch state dict file into float32/int NumPy arrays (CPU, weights_only).

  Accepts a plain state dict, or a dict holding one under 'state_dict' / 'model'; a leading 'module.'
  (DataParallel) is stripped from every key.

  Raises:
    FileNotFoundError: `path` does not exist.
    ImportError: torch is not installed.
    ValueError: the file does not hold a mapping of names to tensors.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"PyTorch checkpoint not found: {path}")
  torch = _import_torch()
  obj = torch.load(str(path), map_location="cpu", weights_only=True)
  for k in ("state_dict", "model"):
    if isinstance(obj, Mapping) and k in obj and isinstance(obj[k], Mapping):
      obj = obj[k]
  if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
    raise ValueError(f"{path}: expected a PyTorch state dict (name -> tensor), got {type(obj).__name__}")
  out = {}
  for k, v in obj.items():
    k = k[len("module."):] if k.startswith("module.") else k
    out[k] = v.detach().cpu().float().numpy() if v.is_floating_point() else v.detach().cpu().numpy()
  return out


def _backbone_prefix(params: Mapping[str, Any]) -> tuple[str, ...]:
  if "conv1a" in params:
    return ()
  if "backbone" in params and "conv1a" in params["backbone"]:
    return ("backbone",)
  raise ValueError("variables['params'] holds no ResNet38 (no 'conv1a' at the top or under 'backbone'); "
                   f"top-level keys: {sorted(params)}")


def _get(tree: Mapping[str, Any], path: tuple[str, ...]):
  for p in path:
    if not isinstance(tree, Mapping) or p not in tree:
      return None
    tree = tree[p]
  return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for p in path[:-1]:
    tree = tree[p]
  tree[path[-1]] = value


def _to_mutable(tree):
  if isinstance(tree, Mapping):
    return {k: _to_mutable(v) for k, v in tree.items()}
  return tree


def map_state_dict(state_dict: Mapping[str, np.ndarray], variables: Mapping[str, Any]
                   ) -> tuple[dict[str, Any], dict[str, list[str]]]:
  """Copies matching torch tensors into a copy of `variables` (non-strict, like load_state_dict(strict=False)).

  Args:
    state_dict: torch key -> NumPy array (conv weights OIHW, BN vectors [C]).
    variables: Flax variables {'params': ..., 'batch_stats': ...} of a ResNet38, CAMClassifier or
      PSPNet (the backbone is found at the top level or under 'backbone').

  Returns:
    (new_variables, report) with report = {'used': torch keys copied, 'missing': Flax leaves (as
    'collection/a/b/leaf') with no torch key, left as initialised, 'unexpected': torch keys with no
    Flax counterpart, 'skipped': num_batches_tracked keys}. All lists sorted.

  Raises:
    ValueError: a matching key has a different shape (e.g. a checkpoint of another width), naming
      the key and both shapes.
  """
  import jax  # noqa: PLC0415

  new = _to_mutable(variables)
  prefix = _backbone_prefix(new["params"])
  used, unexpected, skipped = [], [], []
  filled: set[tuple[str, ...]] = set()
  for key, value in state_dict.items():
    parts = key.split(".")
    if parts[-1] == "num_batches_tracked":
      skipped.append(key)
      continue
    module, leaf = tuple(parts[:-1]), parts[-1]
    target = None
    if module and module[-1].startswith("bn") and leaf in _BN_MAP:
      col, name = _BN_MAP[leaf]
      target = (col,) + prefix + module + (name,)
      arr = value
    elif module and leaf == "weight" and np.ndim(value) == 4:
      target = ("params",) + prefix + module + ("kernel",)
      arr = np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
    if target is None or _get(new, target) is None:
      unexpected.append(key)
      continue
    current = _get(new, target)
    if tuple(current.shape) != tuple(arr.shape):
      raise ValueError(f"checkpoint key {key!r} has shape {tuple(np.shape(value))} (-> {tuple(arr.shape)} in Flax) "
                       f"but the model's {'/'.join(target)} has shape {tuple(current.shape)}; "
                       "is the model width the checkpoint's (1.0 for res38d.pth)?")
    _set(new, target, jax.numpy.asarray(arr, dtype=current.dtype))
    used.append(key)
    filled.add(target)

  missing = []
  for col in ("params", "batch_stats"):
    sub = _get(new, (col,) + prefix)
    if sub is None:
      continue
    for path, _ in jax.tree_util.tree_flatten_with_path(sub)[0]:
      full = (col,) + prefix + tuple(str(p.key) for p in path)
      if full not in filled:
        missing.append("/".join(full))
  report = {"used": sorted(used), "missing": sorted(missing), "unexpected": sorted(unexpected),
            "skipped": sorted(skipped)}
  return new, report


def load_res38d(path: str | os.PathLike, variables: Mapping[str, Any]
                ) -> tuple[dict[str, Any], dict[str, list[str]]]:
  """Loads `res38d.pth` (or any resnet38d-named state dict) into the backbone of `variables`.

  Non-strict like the reference: heads ('fc', 'decode', 'aux') keep their values; see
  `map_state_dict` for the report's fields ('missing' lists only backbone leaves).

  Args:
    path: PyTorch state dict file.
    variables: Flax variables of a width-matching ResNet38 / CAMClassifier / PSPNet.

  Returns:
    (new_variables, report) with report = {'used', 'missing', 'unexpected', 'skipped'}: sorted lists.

  Raises:
    ImportError: torch is absent (install the extra: pip install 'oeem_jax[torch]').
    FileNotFoundError, ValueError: see `read_torch_state_dict` and `map_state_dict`.
  """
  return map_state_dict(read_torch_state_dict(path), variables)
