"""Sharded inputs on 8 simulated CPU devices, in a subprocess of its own.

The device count is fixed when JAX starts, so the checks (tests/_mesh_checks.py)
run in a fresh interpreter; the rest of the suite keeps its single device.
"""

import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent


def test_sharded_inputs_match_and_never_gather():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  result = subprocess.run(
      [sys.executable, str(HERE / "_mesh_checks.py")], env=env, capture_output=True, text=True, timeout=900
  )
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  assert "34 sharded checks passed" in result.stdout
