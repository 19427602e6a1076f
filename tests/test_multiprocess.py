"""Two processes on 127.0.0.1 (jax.distributed, gloo collectives) against one process.

The worker (tests/_multiprocess_worker.py) runs a few DP-SGD steps on a
:class:`clipjax.ShardedPoissonSampler` batch: 2 processes x 2 CPU devices, each
process reading only its own two shards, and 1 process x 4 devices reading all four.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(__file__), "_multiprocess_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 120  # seconds for all three processes; they take about 15 on two busy cores


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(out, process_id, num_processes, devices, port):
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  env = dict(os.environ, XLA_FLAGS=flags.strip())
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
  env.pop("JAX_ENABLE_X64", None)
  args = [sys.executable, WORKER, str(out), str(process_id), str(num_processes), str(port)]
  return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  two, one = tmp_path_factory.mktemp("two"), tmp_path_factory.mktemp("one")
  port = _free_port()
  procs = [_launch(two, p, 2, 2, port) for p in range(2)] + [_launch(one, 0, 1, 4, 0)]
  try:
    outputs = [proc.communicate(timeout=TIMEOUT)[0].decode() for proc in procs]
  finally:
    for proc in procs:
      proc.kill()  # a process left waiting for its peer must not outlive the test
  for proc, output in zip(procs, outputs):
    assert proc.returncode == 0, output[-3000:]
  load = lambda path: dict(np.load(path))  # noqa: E731
  return [load(two / f"process{p}.npz") for p in range(2)], load(one / "process0.npz")


def _params(run):
  return [run[f"arr_{i}"] for i in range(4)]


def test_each_process_holds_its_own_shards(runs):
  (first, second), single = runs
  assert first["shards"].tolist() == [0, 1]
  assert second["shards"].tolist() == [2, 3]
  assert single["shards"].tolist() == [0, 1, 2, 3]


def test_two_processes_match_one_process_of_four_devices(runs):
  (first, second), single = runs
  for a, b, c in zip(_params(first), _params(second), _params(single)):
    np.testing.assert_array_equal(a, b)  # replicated: every process holds the same values
    np.testing.assert_allclose(a, c, rtol=2e-6, atol=2e-7)  # the sum's order may differ


def test_noise_is_one_draw_identical_on_every_process_and_device(runs):
  (first, second), single = runs
  added = first["added"]  # (steps, local devices, parameters)
  for run in (first, second, single):
    assert (run["added"] == run["added"][:, :1]).all()  # every local device
  np.testing.assert_array_equal(first["added"], second["added"])  # bit for bit
  np.testing.assert_array_equal(first["added"][:, 0], single["added"][:, 0])
  # One Gaussian draw of standard deviation σC per coordinate, divided by B = q·n:
  # not zero, not one draw per process (which would be √2 times larger).
  from _multiprocess_worker import CLIP_NORM, NOISE_MULTIPLIER, NUM_SHARDS, SAMPLE_RATE, SHARD_SIZE

  scale = NOISE_MULTIPLIER * CLIP_NORM / (SAMPLE_RATE * NUM_SHARDS * SHARD_SIZE)
  z = added[:, 0].astype(np.float64) / scale
  assert 0.85 < z.std() < 1.15, z.std()  # ~1000 draws: the std is within 0.05 of 1
  assert len({row.tobytes() for row in added[:, 0]}) == len(added)  # a fresh draw each step


def test_no_collective_gathers_the_batch(runs):
  (first, _), _ = runs
  assert first["collectives"].tolist() == ["all-reduce"]


def test_a_key_that_differs_across_processes_is_reported(runs):
  (first, second), single = runs
  for run in (first, second):
    assert "test key differs across processes: processes [1]" in str(run["caught"])
  assert str(single["caught"]) == ""  # one process: nothing to differ
