"""What every summary.json records about its machine (oeem_jax.runtime.env_info) and the pinned versions
(constraints.txt)."""

from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path

import jax
import numpy as np
import pytest

from oeem_jax.runtime import env_info

REPO = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
  pins = {}
  for line in (REPO / "constraints.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
      name, _, version = line.partition("==")
      assert version, f"constraints.txt: {line!r} is not an exact pin"
      pins[re.sub(r"[-_.]+", "-", name).lower()] = version
  return pins


def test_environment_names_versions_cpu_and_devices():
  env = env_info.environment()
  assert env["packages"]["jax"] == jax.__version__ and env["packages"]["numpy"] == np.__version__
  assert env_info.package_versions(("no-such-package-xyz",)) == {"no-such-package-xyz": None}
  assert env["devices"]["platform"] == jax.devices()[0].platform
  assert env["devices"]["device_kind"] == jax.devices()[0].device_kind
  assert env["devices"]["global_devices"] == jax.device_count()
  cpu = env["cpu"]
  assert cpu["model"] and cpu["cores"] == os.cpu_count()
  if Path("/proc/cpuinfo").is_file():
    first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    model = re.search(r"^model name\s*:\s*(.*)$", first, re.M)
    if model:
      assert cpu["model"] == model.group(1).strip()
    flags = re.search(r"^flags\s*:\s*(.*)$", first, re.M)
    if flags:
      assert ("avx2" in cpu["simd"]) == ("avx2" in flags.group(1).split())
  assert env["source"].get("commit") is None or len(env["source"]["commit"]) == 40


def test_constraints_pin_every_package_that_changes_numbers():
  pins = _pins()
  for name in env_info.NUMERIC_PACKAGES:
    if name in ("oeem_jax", "tensorflow"):
      continue
    assert re.sub(r"[-_.]+", "-", name).lower() in pins, name
  # every direct dependency of pyproject.toml is pinned too
  text = (REPO / "pyproject.toml").read_text()
  deps = re.findall(r'^\s*"([A-Za-z0-9_.-]+)[><=;\s"]', text.split("[project.optional-dependencies]")[0], re.M)
  for dep in deps:
    assert re.sub(r"[-_.]+", "-", dep).lower() in pins, dep


@pytest.mark.skipif(os.environ.get("OEEM_CHECK_CONSTRAINTS") != "1",
                    reason="only where the install used -c constraints.txt (.ci/run sets OEEM_CHECK_CONSTRAINTS=1)")
def test_installed_versions_are_the_pinned_ones():
  pins = _pins()
  wrong = {}
  for dist in metadata.distributions():
    name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
    if name in pins and dist.version.split("+")[0] != pins[name]:
      wrong[name] = (dist.version, pins[name])
  assert not wrong, wrong
