"""oeem_jax: JAX/Flax reimplementation of OEEM (Li et al., MICCAI 2022).

Weakly-supervised gland segmentation of H&E colon histology (GlaS) from patch-level labels:
ResNet38 patch classifier -> multi-scale CAM pseudo-masks -> PSPNet trained with the
Online Easy Example Mining loss -> multi-scale sliding-window prediction and GlaS metrics.
All arrays are NHWC.
"""

__version__ = "0.1.0"
