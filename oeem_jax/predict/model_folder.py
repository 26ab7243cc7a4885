"""Self-contained segmenter folders (`export`) and loading a segmenter for `predict`.

A model folder holds:

* `variables/`: the segmenter's `{"params", "batch_stats"}` (orbax `StandardCheckpointer`);
* `model.json` (`FORMAT`): the network (`network.constructor`: the seg stage's network card, its
  constructor arguments; also the config keys `network.model`, `network.seg`), the input
  normalisation (mean / std on 0..255 RGB), the class names, the training pixel size (µm/px; GlaS:
  0.62, its 20x scans), the recommended inference settings (those the source workdir's `eval` stage
  used, else single scale at the training validation window), the stain reference of the training
  images (`oeem_jax.predict.stain.reference`) and provenance (source workdir, seg folder, checkpoint step,
  `params_digest`, data label).

`load_model` takes such a folder, or a workdir (or its `seg` folder) with a finished `seg` stage
(its `summary.json` exists), builds the network (from its card), checks that the weights have
exactly the tree and shapes that network expects, and returns everything `predict` needs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import ml_collections
import numpy as np
from absl import logging

from oeem_jax import errors
from oeem_jax.errors import InputError

FORMAT = "oeem_jax-model/1"
CLASS_NAMES = ("background", "gland")
# GlaS: Zeiss MIRAX MIDI scanner, 20x objective, 0.620 µm per pixel (Sirinukunwattana et al. 2017).
GLAS_MPP = 0.62
SYNTHETIC_LABEL = "SYNTHETIC (the embedded stand-in set: says nothing about real glands)"


@dataclasses.dataclass
class LoadedModel:
  """A segmenter ready for `predict`.

  Attributes:
    card: the `model.json` content (built on the fly for a workdir).
    variables: {"params", "batch_stats"} host arrays.
    model: the flax `PSPNet`.
    normalize: float32[h, w, 3] RGB 0..255 -> network input.
    source: the folder it came from.
  """
  card: dict[str, Any]
  variables: dict[str, Any]
  model: Any
  normalize: Callable[[np.ndarray], np.ndarray]
  source: str


def _read_json(path: Path, what: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise InputError(f"{path}: unreadable {what} ({type(e).__name__}: {e}); expected the JSON file "
                     "oeem_jax wrote") from e


def finished_seg_summary(seg_dir: Path) -> dict[str, Any]:
  """`seg_dir/summary.json` of a finished seg stage.

  Raises:
    InputError: the stage is not finished (no summary.json) or the summary is not a seg stage's.
  """
  path = seg_dir / "summary.json"
  if not path.is_file():
    state = "has checkpoints but " if (seg_dir / "checkpoints").is_dir() else ""
    raise InputError(f"{seg_dir}: the seg stage there is not finished ({state}no summary.json); "
                     "expected a workdir whose seg stage ran to the end (rerun its seg command to "
                     "finish it), or a model folder written by the export stage")
  summary = _read_json(path, "seg stage summary")
  if summary.get("stage") != "seg" or "config" not in summary:
    raise InputError(f"{path}: not a seg stage summary (stage {summary.get('stage')!r}); expected "
                     "WORKDIR/seg/summary.json")
  return summary


def _eval_settings(workdir: Path, seg_dir: Path, trained: ml_collections.ConfigDict
                   ) -> tuple[dict[str, Any], str | None]:
  """Recommended inference settings and the checkpoint the workdir's eval stage used (if it ran on
  this seg folder), else defaults."""
  from oeem_jax.runtime import artifacts

  path = artifacts.summary_path(workdir, "eval")
  if path.is_file():
    ev = _read_json(path, "eval stage summary").get("config", {}).get("eval", {})
    used = Path(ev.get("seg_dir") or artifacts.stage_dir(workdir, "seg"))
    same = used.resolve() == seg_dir.resolve() if used.exists() else False
    if ev and same:
      keys = ("scales", "flip", "window", "stride", "batch_size", "min_object_area", "max_hole_area",
              "split_h")
      settings = {k: ev[k] for k in keys if k in ev}
      settings.setdefault("split_h", 0)  # an eval run from before the key existed
      settings["scales"] = [float(s) for s in settings.get("scales", (1.0,))]
      settings["source"] = str(path)
      return settings, str(ev.get("checkpoint", "latest"))
  seg = trained.get("seg", {})
  return {"scales": [1.0], "flip": True, "window": int(seg.get("eval_window", 320)),
          "stride": int(seg.get("eval_stride", 256)), "batch_size": 8, "min_object_area": 0,
          "max_hole_area": 0, "split_h": 0, "source": "defaults (no eval stage in the source workdir)"}, None


def _stain_reference(trained: ml_collections.ConfigDict, data_dir: str) -> tuple[Any, str]:
  """(stain reference of the segmenter's training images or None, note)."""
  from oeem_jax.data import loader
  from oeem_jax.predict import stain

  if data_dir == "none":
    return None, "stain reference skipped (export.data_dir = 'none')"
  data = ml_collections.ConfigDict(trained.data.to_dict())
  if data_dir:
    data.dir = data_dir
  try:
    splits = loader.load_splits(data)
  except (errors.GlasDataError, FileNotFoundError) as e:
    logging.warning("no stain reference: the training images are not readable (%s)", e)
    return None, f"stain reference skipped: training images not readable ({e})"
  images = [ex.image for ex in splits.splits["train"]]
  return stain.reference(images), f"{len(images)} training images of {splits.source}"


def card_from_seg_stage(seg_dir: str | Path, checkpoint: str = "", *, pixel_size_um: float = -1.0,
                        data_dir: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
  """The model card and variables of a finished seg stage (what `export` writes).

  Args:
    seg_dir: WORKDIR/seg.
    checkpoint: "latest", "best" or a step; "" = the one WORKDIR/eval used, else "latest".
    pixel_size_um: training pixel size (µm/px); -1 = GlaS's 0.62 when the seg run trained on a
      GlaS folder, unknown (None) on the synthetic set; 0 = unknown.
    data_dir: folder of the training images for the stain reference ("" = the seg run's
      data.dir; "none" = no reference).

  Returns:
    (card dict, variables {"params", "batch_stats"}).

  Raises:
    InputError: unfinished seg stage, missing checkpoint.
  """
  from oeem_jax.engine.checkpoint import load_variables, params_digest
  from oeem_jax.models import factory
  from oeem_jax.models.network import config_input_stats as input_stats
  from oeem_jax.models.network import trained_network

  seg_dir = Path(seg_dir).expanduser()
  summary = finished_seg_summary(seg_dir)
  trained = ml_collections.ConfigDict(summary["config"])
  workdir = seg_dir.parent
  settings, eval_checkpoint = _eval_settings(workdir, seg_dir, trained)
  which = checkpoint or eval_checkpoint or "latest"
  try:
    variables, step = load_variables(seg_dir, which)
  except FileNotFoundError as e:
    raise InputError(f"{seg_dir}: no {which!r} checkpoint ({e})") from e
  synthetic = bool(summary.get("synthetic_data", not trained.data.get("dir", "")))
  if pixel_size_um is None or float(pixel_size_um) < 0:
    mpp = None if synthetic else GLAS_MPP
  else:
    mpp = float(pixel_size_um) or None
  stats = input_stats(trained)
  from oeem_jax.models.network import SEG_MEAN, SEG_STD
  mean, std = (stats if stats is not None else (SEG_MEAN.tolist(), SEG_STD.tolist()))
  reference, stain_note = _stain_reference(trained, data_dir)
  seg = trained.get("seg", ml_collections.ConfigDict())
  card = {
      "format": FORMAT,
      "network": {"model": trained.model.to_dict(),
                  "seg": {"num_classes": int(seg.get("num_classes", factory.NUM_CLASSES)),
                          "b7_dilation": int(seg.get("b7_dilation", factory.SEG_B7_DILATION))},
                  "constructor": trained_network(seg_dir, "seg").card},
      "input": {"channels": "RGB", "range": "0..255", "mean": [float(v) for v in mean],
                "std": [float(v) for v in std],
                "stats": None if stats is None else [list(map(float, s)) for s in stats]},
      "classes": list(CLASS_NAMES),
      "pixel_size_um": mpp,
      "inference": settings,
      "stain_reference": reference,
      "provenance": {
          "source_workdir": str(workdir.resolve()), "seg_dir": str(seg_dir.resolve()),
          "checkpoint": which, "step": int(step), "params_digest": params_digest(variables["params"]),
          "train_steps": summary.get("steps"), "synthetic": synthetic,
          "data_label": SYNTHETIC_LABEL if synthetic else f"GlaS ({trained.data.get('dir', '')})",
          "stain_reference": stain_note,
          "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
          "oeem_jax_version": _version(),
      },
  }
  return card, variables


def _version() -> str:
  from oeem_jax import __version__
  return __version__


def write_model_folder(out: str | Path, card: dict[str, Any], variables: dict[str, Any]) -> Path:
  """Writes a model folder atomically: everything goes to a temp folder beside `out`, which then
  replaces `out` (a killed export leaves the old folder or none, never half of one).

  Returns:
    `out` as a Path.
  """
  import orbax.checkpoint as ocp

  out = Path(out).expanduser().absolute()
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
  try:
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp / "variables", {"params": variables["params"],
                                  "batch_stats": variables.get("batch_stats", {})})
    ckpt.wait_until_finished()
    ckpt.close()
    from oeem_jax.runtime import io_utils
    io_utils.atomic_write_json(tmp / "model.json", card)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp / mkstemp make owner-only; a model folder is for sharing
    os.chmod(tmp / "model.json", 0o666 & ~umask)
    old = None
    if out.exists():
      old = out.parent / f".{out.name}.old-{os.getpid()}"
      os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def build_network(card: dict[str, Any]):
  """The `PSPNet` of a card's `network` section: from `network.constructor` (the seg stage's network
  card, `oeem_jax.models.factory.network_from_card`) when present, else (folders exported before it
  existed) from `network.model` / `network.seg` (`oeem_jax.models.make_segmenter`).

  Raises:
    KeyError: no `network`, `network.model` or `network.seg`; ValueError / TypeError: bad values.
  """
  from oeem_jax.models import factory, make_segmenter
  net = card["network"]
  if "constructor" in net:
    return factory.network_from_card(net["constructor"])
  return make_segmenter(ml_collections.ConfigDict({"model": net["model"], "seg": net["seg"]}))


def check_compatible(model, variables: dict[str, Any], where: str, window: int = 64) -> None:
  """Checks that `variables` have exactly the tree and shapes `model` expects.

  Raises:
    InputError: a missing, extra or differently shaped array (the first few are named).
  """
  import jax
  import jax.numpy as jnp

  abstract = jax.eval_shape(
      lambda r: model.init({"params": r, "dropout": r}, jnp.zeros((1, window, window, 3)),
                           train=False), jax.random.PRNGKey(0))
  want = {jax.tree_util.keystr(k): tuple(v.shape)
          for k, v in jax.tree_util.tree_flatten_with_path(
              {c: abstract.get(c, {}) for c in ("params", "batch_stats")})[0]}
  have = {jax.tree_util.keystr(k): tuple(np.shape(v))
          for k, v in jax.tree_util.tree_flatten_with_path(
              {c: variables.get(c, {}) for c in ("params", "batch_stats")})[0]}
  problems = [f"{k} missing from the weights" for k in sorted(set(want) - set(have))]
  problems += [f"{k} in the weights but not in the network" for k in sorted(set(have) - set(want))]
  problems += [f"{k} is {have[k]} in the weights but {want[k]} in the network"
               for k in sorted(set(want) & set(have)) if want[k] != have[k]]
  if problems:
    raise InputError(f"{where}: the network config does not match the weights ({len(problems)} "
                     f"problems; first: {'; '.join(problems[:3])}); expected the model.json that was "
                     "exported with these weights")


def _normalizer(card: dict[str, Any]):
  from oeem_jax.models.network import normalizer
  stats = card["input"].get("stats")
  return normalizer("seg", None if stats is None else tuple(tuple(float(v) for v in s) for s in stats))


def resolve(spec: str) -> tuple[str, Path]:
  """What `predict.model` names: ("folder", model folder) or ("seg", seg stage folder).

  Accepts a model folder (holds model.json), a workdir with `export/model/model.json` (that model)
  or with a `seg/` stage folder, or a seg stage folder itself.

  Raises:
    InputError: empty, missing, or none of these.
  """
  if not str(spec or "").strip():
    raise InputError("config key predict.model is empty; expected a model folder written by the "
                     "export stage (WORKDIR/export/model) or a workdir with a finished seg stage")
  path = Path(spec).expanduser()
  if not path.exists():
    raise InputError(f"config key predict.model: {path} does not exist; expected a model folder "
                     "(WORKDIR/export/model) or a workdir with a finished seg stage")
  if (path / "model.json").is_file():
    return "folder", path
  from oeem_jax.runtime import artifacts

  exported = artifacts.exported_model_dir(artifacts.stage_dir(path, "export"))
  if (exported / "model.json").is_file():
    return "folder", exported
  if artifacts.stage_dir(path, "seg").is_dir():
    return "seg", artifacts.stage_dir(path, "seg")
  if (path / "summary.json").is_file() or (path / "checkpoints").is_dir():
    return "seg", path
  if (path / "variables").is_dir():
    raise InputError(f"{path}: model folder without model.json; expected the model.json the export "
                     "stage writes next to variables/")
  raise InputError(f"config key predict.model: {path} is neither a model folder (no model.json) nor "
                   "a workdir with a seg stage (no seg/); expected WORKDIR/export/model or WORKDIR")


def load_model(spec: str, checkpoint: str = "latest") -> LoadedModel:
  """Loads a model folder or a finished seg stage for `predict` (see `resolve`).

  Args:
    spec: `predict.model`.
    checkpoint: for a seg stage: "latest", "best" or a step ("" = the one its eval stage used).

  Raises:
    InputError: anything missing, unreadable or incompatible (named in the message).
  """
  kind, path = resolve(spec)
  if kind == "seg":
    card, variables = card_from_seg_stage(path, checkpoint)
  else:
    card = _read_json(path / "model.json", "model card")
    if card.get("format") != FORMAT:
      raise InputError(f"{path / 'model.json'}: format {card.get('format')!r}; expected {FORMAT!r}")
    for key in ("network", "input", "inference", "provenance"):
      if key not in card:
        raise InputError(f"{path / 'model.json'}: key {key!r} missing; expected a card written by "
                         "the export stage")
    vdir = path / "variables"
    if not vdir.is_dir():
      raise InputError(f"{path}: model folder without weights (no variables/); expected the "
                       "orbax folder the export stage writes beside model.json")
    import orbax.checkpoint as ocp
    try:
      with ocp.StandardCheckpointer() as ckpt:
        variables = ckpt.restore(vdir.absolute())
    except Exception as e:  # orbax raises FileNotFoundError, ValueError, tensorstore errors, ...
      raise InputError(f"{vdir}: unreadable weights ({type(e).__name__}: {str(e)[:300]}); expected "
                       "the orbax checkpoint the export stage writes") from e
    variables = {"params": variables.get("params", {}),
                 "batch_stats": variables.get("batch_stats", {}) or {}}
  try:
    model = build_network(card)
  except (KeyError, ValueError, TypeError) as e:
    raise InputError(f"{path}: bad network config in the model card ({type(e).__name__}: {e})") from e
  check_compatible(model, variables, str(path))
  return LoadedModel(card=card, variables=variables, model=model, normalize=_normalizer(card),
                     source=str(path))


# ---------------------------------------------------------------------------------------------------
# A model folder with random weights: what the tests and launch/bench_predict.py run predict with
# when the plumbing (region reads, masks, polygons, CSV, overlays) is what they check.

TINY_NETWORK = {"model": {"backbone": "resnet38", "width": 0.0625, "init_checkpoint": "", "bn": "auto",
                          "dtype": "float32"}, "seg": {"num_classes": 2, "b7_dilation": 4}}
TINY_WINDOW, TINY_STRIDE, TINY_BATCH = 48, 32, 4


def random_variables(model, seed: int = 0, window: int = TINY_WINDOW) -> dict[str, Any]:
  """Random variables of a segmenter: fan-in scaled normal kernels made zero-mean over their inputs
  (so the ReLU features' common offset cancels and the output follows the image), zero biases,
  identity BN. Only `jax.eval_shape` of the init runs (no compile).

  Args:
    model: a network from `build_network`.
    seed: NumPy seed of the kernels.
    window: input side used to trace the init.

  Returns:
    {"params": ..., "batch_stats": ...} of float32 NumPy arrays.
  """
  import jax
  import jax.numpy as jnp

  abstract = jax.eval_shape(
      lambda r: model.init({"params": r, "dropout": r}, jnp.zeros((1, window, window, 3)), train=False),
      jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']"):
      k = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
      return (k - k.mean(axis=tuple(range(k.ndim - 1)), keepdims=True)).astype(np.float32)
    if name.endswith("['scale']") or name.endswith("['var']"):
      return np.ones(leaf.shape, np.float32)
    return np.zeros(leaf.shape, np.float32)

  return jax.tree_util.tree_map_with_path(
      fill, {"params": abstract["params"], "batch_stats": abstract["batch_stats"]})


def random_model_card(variables: dict[str, Any], *, pixel_size_um: float = 0.62,
                      reference: dict[str, Any] | None = None, flip: bool = True) -> dict[str, Any]:
  """The model card (model.json) of `TINY_NETWORK` with `variables`: one scale, window 48 / stride
  32, no post-processing, provenance labelled SYNTHETIC (random weights)."""
  from oeem_jax.engine.checkpoint import params_digest
  from oeem_jax.models.network import SEG_MEAN, SEG_STD

  return {
      "format": FORMAT, "network": TINY_NETWORK,
      "input": {"channels": "RGB", "range": "0..255", "mean": SEG_MEAN.tolist(),
                "std": SEG_STD.tolist(), "stats": None},
      "classes": list(CLASS_NAMES), "pixel_size_um": pixel_size_um,
      "inference": {"scales": [1.0], "flip": flip, "window": TINY_WINDOW, "stride": TINY_STRIDE,
                    "batch_size": TINY_BATCH, "min_object_area": 0, "max_hole_area": 0, "split_h": 0,
                    "source": "test"},
      "stain_reference": reference,
      "provenance": {"params_digest": params_digest(variables["params"]), "step": 0,
                     "synthetic": True, "data_label": "SYNTHETIC (random test weights)"},
  }

