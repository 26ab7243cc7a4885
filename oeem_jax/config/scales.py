"""Default image scales of the method, one source for the code defaults and the configs.

Kept free of imports so that the config files (configs/cam.py, configs/eval.py) can read them
without loading JAX.
"""

# Multi-scale CAM of the pseudo-masks (stage cam, `pseudo_mask.multiscale_cam`): each 112 px tile
# is rescaled by these factors (canvas 112 ... 224 px) and its CAMs are averaged (paper Eq. 1-2, §2.3).
CAM_SCALES = (1.0, 1.25, 1.5, 1.75, 2.0)

# Multi-scale (x flip) sliding-window inference of the segmenter (stage eval,
# `inference.predict_probs`): the paper's test-time scales (paper §2.3).
INFERENCE_SCALES = (0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)
