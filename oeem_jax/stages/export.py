"""Stage `export`: a self-contained model folder from a finished `seg` stage (configs/export.py).

    python -m oeem_jax.main --config=configs/export.py --workdir=W

Reads W/seg (the network from its network.json, provenance from its summary.json, the weights from
its checkpoint: by default the one W/eval used, else the final one) and writes W/export/model/
(`export.out` to put it elsewhere): `variables/` (orbax) and `model.json` with the network config,
input normalisation, class names, training pixel size, recommended inference settings (those of
W/eval when it ran), the stain reference of the training images and provenance
(`oeem_jax.predict.model_folder`). The folder is written under a temp name and renamed, so a killed export
leaves no half-written model.

`python -m oeem_jax.main --config=configs/predict.py --config.predict.model=W/export/model ...`
then needs nothing else from W.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_collections
from absl import logging

from oeem_jax.predict import model_folder
from oeem_jax.runtime import artifacts


def run(config: ml_collections.ConfigDict, stage_dir: Path) -> dict[str, Any]:
  """Writes the model folder; returns its path and the card's provenance.

  Raises:
    InputError: the seg stage is not finished, or the checkpoint is missing.
  """
  cfg = config.export
  mpp = float(cfg.pixel_size_um)  # range checked by config.check (-1, 0 or > 0)
  seg_dir = artifacts.upstream_dir(stage_dir, "seg", cfg.seg_dir)
  card, variables = model_folder.card_from_seg_stage(
      seg_dir, str(cfg.checkpoint), pixel_size_um=mpp, data_dir=str(cfg.data_dir))
  out = Path(cfg.out).expanduser() if cfg.out else artifacts.exported_model_dir(stage_dir)
  model_folder.check_compatible(model_folder.build_network(card), variables, str(seg_dir))
  model_folder.write_model_folder(out, card, variables)
  prov = card["provenance"]
  mpp_text = (f"{card['pixel_size_um']} µm/px" if card["pixel_size_um"] else
              "pixel size unknown (predict will not rescale)")
  logging.info("export: %s step %d (%s) -> %s; %s; inference settings from %s", seg_dir,
               prov["step"], prov["checkpoint"], out, mpp_text, card["inference"]["source"])
  if prov["synthetic"]:
    logging.warning("export: this segmenter was trained on %s", model_folder.SYNTHETIC_LABEL)
  return {
      "model_dir": str(out),
      "provenance": prov,
      "pixel_size_um": card["pixel_size_um"],
      "inference": card["inference"],
      "stain_reference": card["stain_reference"] is not None,
      "final_line": f"exported {seg_dir} (step {prov['step']}, {prov['data_label']}) to {out}",
  }
