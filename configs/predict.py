r"""Stage `predict`: gland masks, measurements and QuPath annotations for your own images.

    python -m oeem_jax.main --config=configs/predict.py --config.predict.model=W/export/model \
        --config.predict.inputs='slides/*.tif' --workdir=OUT

`predict.model`: a model folder (configs/export.py) or a workdir with a finished seg stage.
`predict.inputs`: an image file, a folder of images or a glob (PNG, JPEG, BMP, TIFF). Outputs in
OUT/predict/ (docs/predict.md). The inference keys left unset (None) take the model's recommended
values (those its workdir's eval stage used).
"""

import ml_collections
from ml_collections import config_dict

from oeem_jax.config import base as config_base

ARGS = {"": "no arguments"}  # what --help lists


def get_config(arg: str | None = None):
  config_base.parse_arg(arg, ARGS, __file__)
  c = config_base.get_base_config("predict")
  p = c.predict = ml_collections.ConfigDict()
  p.model = ""                   # model folder (WORKDIR/export/model) or a workdir with seg/
  p.checkpoint = "latest"        # for a workdir: "latest", "best", a step, "" = the one eval used
  p.inputs = ""                  # file, folder or glob
  # µm per pixel of the inputs; 0 = read it from the file (TIFF resolution tags, SVS, OME-XML).
  # With the model's training pixel size (GlaS 0.62), inputs are rescaled to the model's resolution.
  p.input_mpp = 0.0
  # Inference (None = the model's recommended value).
  p.scales = config_dict.placeholder(tuple)
  p.flip = config_dict.placeholder(bool)
  p.window = config_dict.placeholder(int)
  p.stride = config_dict.placeholder(int)
  p.batch_size = config_dict.placeholder(int)
  # Post-processing as in eval, areas in model pixels (None = the model's; 0 = off).
  p.min_object_area = config_dict.placeholder(int)
  p.max_hole_area = config_dict.placeholder(int)
  # Touching glands split for the per-gland CSV / GeoJSON (metrics.split_instances), in model
  # pixels (None = the model's; 0 = off, glands are the 8-connected components).
  p.split_h = config_dict.placeholder(int)
  # Large images: core side of a region (px of the input); peak memory per region grows with
  # (region_size x the largest scale)^2, not with the image.
  p.region_size = 4096
  # Align region reads so that every scale's window grid matches whole-image inference (region by
  # region = whole image); False: stride alignment only (less overlap, exact at scale 1 only).
  p.align_regions = True
  p.overlay_max_side = 2048      # overlays are downsampled by an integer factor to at most this
  p.tiff_mask_pixels = 4096 * 4096  # masks of images with more pixels are tiled TIFFs, else PNG
  # Tissue detection (oeem_jax.predict.tissue): only windows on or near tissue are predicted, glass
  # is non-gland. "auto" = on for images above tiff_mask_pixels (slides), "on", "off".
  p.tissue_detection = "auto"
  p.simplify_px = 0.0            # GeoJSON polygon simplification in px (0 = exact pixel outlines)
  p.stain_check = True           # compare colours with the training images (oeem_jax.predict.stain)
  p.stain_z_max = 6.0            # flag an image more than this many std from the training mean
  p.skip_done = True             # a rerun skips images whose record matches input, model, settings
  return c
