"""Flax <-> PyTorch parity of ResNet38 / CAMClassifier / PSPNet and of the res38d.pth importer.

The PyTorch (NCHW) implementation of the networks is `launch/torch_reference.py` (used by tests
and benchmarks only; the package never imports it, nor torch except to read a checkpoint). Its module names follow the
reference resnet38d state-dict convention (conv1a, b2, b2_1, ..., b7, bn7; bn_branch2a, conv_branch2a,
bn_branch2b1, conv_branch2b1, bn_branch2b2, conv_branch2b2, conv_branch1 inside blocks), so a random
state dict saved from it has the keys of the real `res38d.pth`. The test saves one, imports it with
`load_res38d`, and compares eval-mode outputs.

`launch/bench_models.py --torch` times the same PyTorch networks on the same shapes.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed (pip install 'oeem_jax[torch]'); "
                            "Flax<->PyTorch parity needs it")
nn = torch.nn

from torch_reference import TorchCAMClassifier, TorchPSPNet, TorchResNet38  # noqa: E402  (after the importorskip)


def randomize_(module: nn.Module, seed: int) -> None:
  """Random weights with O(1) activations, and non-trivial BN running statistics."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (1.0 / fan_in) ** 0.5)
        if m.bias is not None:
          m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
      elif isinstance(m, nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(1.0 + 0.2 * torch.randn(n, generator=g))
        m.bias.copy_(0.2 * torch.randn(n, generator=g))
        m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
        m.running_var.copy_(0.5 + torch.rand(n, generator=g))
        m.num_batches_tracked.fill_(7)
      elif isinstance(m, nn.Linear):
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.05)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def _filled_variables(model, shape, seed: int = 0, **kwargs):
  """Variables of `model` with the structure of model.init, filled on the host with N(0, 0.05).

  Avoids compiling model.init (tens of seconds on 2 cores); every value that matters here is
  overwritten by the import or copied from torch anyway.
  """
  import jax
  import jax.numpy as jnp

  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  abstract = jax.eval_shape(lambda: model.init(rngs, jnp.zeros(shape), train=False, **kwargs))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), s.dtype), abstract)


def _nhwc(t) -> np.ndarray:
  return t.detach().permute(0, 2, 3, 1).numpy()


WIDTH = 1 / 16  # 4..256 channels: a few seconds per forward on 2 cores


@pytest.fixture(scope="module")
def torch_backbone_file(tmp_path_factory):
  torch.manual_seed(0)
  net = TorchResNet38(WIDTH, b7_dilation=2)
  randomize_(net, seed=1)
  net.eval()
  path = tmp_path_factory.mktemp("ckpt") / "res38d_random.pth"
  torch.save(net.state_dict(), str(path))
  return net, path


def test_state_dict_keys_follow_reference_names(torch_backbone_file):
  net, _ = torch_backbone_file
  keys = set(net.state_dict())
  for k in ["conv1a.weight", "b2.conv_branch1.weight", "b2_1.bn_branch2a.running_var",
            "b4_5.conv_branch2b1.weight", "b5.conv_branch1.weight", "b6.bn_branch2b2.weight",
            "b7.conv_branch2b2.weight", "bn7.running_mean", "b7.bn_branch2a.num_batches_tracked"]:
    assert k in keys, k
  assert "b2_1.conv_branch1.weight" not in keys  # identity shortcut: same shape, stride 1


def test_backbone_and_classifier_parity(torch_backbone_file):
  import jax
  import jax.numpy as jnp

  from oeem_jax.models import CAMClassifier
  from oeem_jax.models.import_torch import load_res38d

  tnet, path = torch_backbone_file
  model = CAMClassifier(width=WIDTH, num_classes=2, b7_dilation=2, bn_frozen=True)
  x = np.random.default_rng(0).standard_normal((2, 45, 45, 3)).astype(np.float32)  # odd size
  variables = _filled_variables(model, (1, 45, 45, 3))
  variables, report = load_res38d(path, variables)

  n_bn = sum(1 for k in tnet.state_dict() if k.endswith("num_batches_tracked"))
  assert len(report["used"]) == len(tnet.state_dict()) - n_bn
  assert report["missing"] == [] and report["unexpected"] == []
  assert len(report["skipped"]) == n_bn

  # Torch classifier with the same backbone and the Flax head copied over.
  tcls = TorchCAMClassifier(WIDTH).eval()
  tcls.backbone.load_state_dict(tnet.state_dict())
  with torch.no_grad():
    tcls.fc.weight.copy_(torch.from_numpy(np.asarray(variables["params"]["fc"]["kernel"]).T.copy()))
    tcls.fc.bias.copy_(torch.from_numpy(np.array(variables["params"]["fc"]["bias"])))
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    feats_t = tnet(xt)
    logits_t = tcls(xt).numpy()
    cam_t = _nhwc(tcls.cam(xt))

  feats, logits, cam = jax.jit(lambda v, x: (
      model.apply(v, x, False, method=lambda m, x, t: m.backbone(x, t)),
      model.apply(v, x, train=False),
      model.apply(v, x, method=CAMClassifier.cam)))(variables, jnp.asarray(x))
  for k in ("b5_in", "b6_in", "out"):
    ref = _nhwc(feats_t[k])
    assert feats[k].shape == ref.shape == (2, 6, 6, feats[k].shape[-1])
    scale = float(np.abs(ref).max())
    assert 0.1 < scale < 100, (k, scale)  # the comparison is meaningful (not all zeros)
    np.testing.assert_allclose(np.asarray(feats[k]), ref, atol=1e-4 * max(1.0, scale), rtol=0, err_msg=k)

  np.testing.assert_allclose(np.asarray(logits), logits_t, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(cam), cam_t, atol=1e-4, rtol=0)


def test_pspnet_parity(torch_backbone_file):
  import jax
  import jax.numpy as jnp

  from oeem_jax.models import PSPNet
  from oeem_jax.models.import_torch import load_res38d

  tnet, path = torch_backbone_file
  model = PSPNet(width=WIDTH, num_classes=2, b7_dilation=4)
  size = 75  # odd; stride-8 map 10x10: bins 3 and 6 overlap (10 is not a multiple of 3 or 6)
  x = np.random.default_rng(1).standard_normal((1, size, size, 3)).astype(np.float32)
  variables = _filled_variables(model, (1, size, size, 3))
  variables, report = load_res38d(path, variables)
  assert report["missing"] == [] and report["unexpected"] == []

  tpsp = TorchPSPNet(WIDTH)
  randomize_(tpsp, seed=2)
  tpsp.backbone.load_state_dict(tnet.state_dict())
  tpsp.eval()

  # Copy the torch head into the Flax tree (torch -> Flax: conv OIHW -> HWIO).
  p, bs = variables["params"], variables["batch_stats"]

  def put_cbr(flax_name_path, seq):
    conv_t, bn_t = seq[0], seq[1]
    pp, bb = p, bs
    for n in flax_name_path:
      pp, bb = pp[n], bb[n]
    pp["conv"]["kernel"] = jnp.asarray(conv_t.weight.detach().permute(2, 3, 1, 0).numpy())
    pp["bn"]["scale"] = jnp.asarray(bn_t.weight.detach().numpy())
    pp["bn"]["bias"] = jnp.asarray(bn_t.bias.detach().numpy())
    bb["bn"]["mean"] = jnp.asarray(bn_t.running_mean.numpy())
    bb["bn"]["var"] = jnp.asarray(bn_t.running_var.numpy())

  for b, m in zip(tpsp.bins, tpsp.ppm):
    put_cbr(("decode", f"ppm_{b}"), m)
  put_cbr(("decode", "bottleneck"), tpsp.bottleneck)
  put_cbr(("aux", "conv"), tpsp.aux_conv)
  for flax_head, conv_t in (("decode", tpsp.conv_seg), ("aux", tpsp.aux_conv_seg)):
    p[flax_head]["conv_seg"]["kernel"] = jnp.asarray(conv_t.weight.detach().permute(2, 3, 1, 0).numpy())
    p[flax_head]["conv_seg"]["bias"] = jnp.asarray(conv_t.bias.detach().numpy())

  logits, aux = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(x))
  with torch.no_grad():
    lt, at = tpsp(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
  assert logits.shape == aux.shape == (1, size, size, 2)
  for got, ref in ((logits, _nhwc(lt)), (aux, _nhwc(at))):
    scale = float(np.abs(ref).max())
    assert scale > 0.01
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4 * max(1.0, scale), rtol=0)


def test_import_rejects_wrong_width(torch_backbone_file):
  from oeem_jax.models import ResNet38
  from oeem_jax.models.import_torch import load_res38d

  _, path = torch_backbone_file
  variables = _filled_variables(ResNet38(width=2 * WIDTH), (1, 16, 16, 3))
  with pytest.raises(ValueError, match="conv1a.weight"):
    load_res38d(path, variables)


def test_import_reports_unexpected_and_missing(tmp_path):
  from oeem_jax.models import ResNet38
  from oeem_jax.models.import_torch import load_res38d

  net = TorchResNet38(WIDTH)
  sd = {k: v for k, v in net.state_dict().items() if not k.startswith("bn7.")}
  sd["fc8.weight"] = torch.zeros(2, 4, 1, 1)  # a head the backbone does not have
  path = tmp_path / "partial.pth"
  torch.save(sd, str(path))
  variables = _filled_variables(ResNet38(width=WIDTH), (1, 16, 16, 3))
  new, report = load_res38d(path, variables)
  assert report["unexpected"] == ["fc8.weight"]
  assert report["missing"] == ["batch_stats/bn7/mean", "batch_stats/bn7/var", "params/bn7/bias",
                               "params/bn7/scale"]
  # Missing leaves keep their initial values; used ones are the torch tensors (OIHW -> HWIO).
  np.testing.assert_array_equal(new["params"]["bn7"]["scale"], variables["params"]["bn7"]["scale"])
  np.testing.assert_array_equal(new["params"]["conv1a"]["kernel"],
                                net.conv1a.weight.detach().permute(2, 3, 1, 0).numpy())


def test_missing_file_error(tmp_path):
  from oeem_jax.models.import_torch import load_res38d
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    load_res38d(tmp_path / "nope.pth", {"params": {}})
