"""Kill a private training run with SIGKILL (between and during saves), resume it, compare.

The run (tests/_checkpoint_worker.py) saves every SAVE_EVERY steps with
:func:`clipjax.save_checkpoint` and resumes with :func:`clipjax.restore_checkpoint`.
A resumed run must end with the parameters and clip norm of an uninterrupted one, bit
for bit, and report the ε of exactly STEPS steps; a damaged checkpoint or another
configuration must be refused with a clear error.
"""

import glob
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("orbax.checkpoint")

import _checkpoint_worker as worker  # noqa: E402

import clipjax  # noqa: E402

WORKER = worker.__file__
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 120  # seconds per worker process; each takes about 10 on two busy cores


def _start(directory, out, **extra_env):
  env = dict(os.environ, **extra_env)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
  env.pop("JAX_ENABLE_X64", None)
  proc = subprocess.Popen(
    [sys.executable, WORKER, str(directory), str(out)],
    env=env,
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
  )
  guard = threading.Timer(TIMEOUT, proc.kill)  # a hung worker ends, and so does readline
  guard.start()
  proc.guard = guard
  return proc


def _go(proc):
  """Lets a worker started with WAIT=1 (imported and compiled already) restore and train."""
  assert _until(proc, "ready")[-1] == "ready"
  proc.stdin.write("go\n")
  proc.stdin.flush()


def _until(proc, line):
  """Reads the worker's output up to ``line``; returns every line read."""
  seen = []
  for got in proc.stdout:
    seen.append(got.strip())
    if seen[-1] == line:
      return seen
  raise AssertionError(f"the worker ended before printing {line!r}: {seen}")


def _finish(proc):
  output = proc.stdout.read()
  proc.wait()
  proc.guard.cancel()
  assert proc.returncode == 0, output
  return output


def _kill(proc):
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  proc.guard.cancel()
  assert proc.returncode == -signal.SIGKILL


def _interrupted(directory, step):
  return glob.glob(os.path.join(directory, f"{step}.orbax-checkpoint-tmp*"))


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
  """(uninterrupted result, resumed result, the directory, what each run did)."""
  root = tmp_path_factory.mktemp("checkpoints")
  directory, reference = root / "run", root / "reference"
  rng = np.random.default_rng(27)
  saves = list(range(worker.SAVE_EVERY, worker.STEPS + 1, worker.SAVE_EVERY))
  between = range(worker.SAVE_EVERY + 1, worker.STEPS - worker.SAVE_EVERY)
  between = [t for t in between if t % worker.SAVE_EVERY]
  kill_between = int(rng.choice(between))
  last_save = kill_between - kill_between % worker.SAVE_EVERY
  kill_during = int(rng.choice([s for s in saves if s > last_save]))
  log = {"kill_between": kill_between, "kill_during": kill_during}

  uninterrupted = _start(reference, root / "reference.npz")
  # All start now, so that their imports and compilations overlap; each waits for "go"
  # before it restores.
  first = _start(directory, root / "unused.npz", WAIT="1", PAUSE_AFTER=str(kill_between))
  second = _start(directory, root / "unused.npz", WAIT="1", SLOW_SAVE=str(kill_during))
  third = _start(directory, root / "resumed.npz", WAIT="1")
  # 1. Killed between two saves: the next run resumes from the last save before it.
  _go(first)
  log["first"] = _until(first, f"step {kill_between}")
  _kill(first)
  # 2. Killed during a save (as soon as its temporary directory appears; the worker
  # holds the rename back long enough for that): not finalised, so not a checkpoint.
  _go(second)
  log["second"] = _until(second, f"saving {kill_during}")
  deadline = time.monotonic() + 30
  while not _interrupted(directory, kill_during) and time.monotonic() < deadline:
    time.sleep(0.001)
  _kill(second)
  log["during"] = bool(_interrupted(directory, kill_during))
  log["steps_after_kill"] = sorted(int(n) for n in os.listdir(directory) if n.isdigit())
  shutil.copytree(directory, root / "killed")  # with the interrupted save, for a test below
  # 3. Runs to the end.
  _go(third)
  log["third"] = _finish(third).split("\n")
  _finish(uninterrupted)
  load = lambda name: dict(np.load(root / name))  # noqa: E731
  return load("reference.npz"), load("resumed.npz"), root, log


def test_runs_were_killed_between_and_during_saves(resumed):
  _, _, _, log = resumed
  between, during = log["kill_between"], log["kill_during"]
  last_save = between - between % worker.SAVE_EVERY
  assert log["second"][0] == f"resumed {last_save}"
  assert log["during"], "the kill landed outside the save"
  assert log["steps_after_kill"][-1] == during - worker.SAVE_EVERY  # not finalised
  assert log["third"][0] == f"resumed {during - worker.SAVE_EVERY}"


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(resumed):
  reference, result, _, _ = resumed
  for name in ("w", "b", "clip_norm"):  # params, and the adaptive clip norm
    np.testing.assert_array_equal(result[name], reference[name])
  assert float(reference["clip_norm"]) != worker.CLIP_NORM  # it did adapt


def test_epsilon_counts_every_step_once(resumed):
  reference, result, _, _ = resumed
  assert int(result["steps"]) == worker.STEPS
  config, *_ = worker.build()
  sampler = config.sampler
  eps = {
    steps: clipjax.dp_epsilon(
      worker.NOISE_MULTIPLIER, steps=steps, delta=1e-5, accountant="rdp", **sampler.accounting
    )
    for steps in (worker.STEPS - 1, worker.STEPS, worker.STEPS + 1)
  }
  assert float(result["epsilon"]) == eps[worker.STEPS] == float(reference["epsilon"])
  assert eps[worker.STEPS - 1] < eps[worker.STEPS] < eps[worker.STEPS + 1]


@pytest.mark.parametrize(
  ("change", "named"),
  [
    ({"clip_norm": 0.5}, "clip_norm: checkpoint 1.0, this run 0.5"),
    ({"noise_multiplier": 1.0}, "noise_multiplier: checkpoint 1.2, this run 1.0"),
    ({"sample_rate": 0.25}, "sampler.sample_rate: checkpoint 0.125, this run 0.25"),
  ],
)
def test_another_configuration_is_refused(resumed, change, named):
  _, _, root, _ = resumed
  config, fresh, _, _ = worker.build(**change)
  with pytest.raises(ValueError, match="another privacy configuration") as error:
    clipjax.restore_checkpoint(root / "run", fresh, config)
  assert named in str(error.value)


def _latest(directory):
  return os.path.join(directory, str(max(int(n) for n in os.listdir(directory) if n.isdigit())))


def test_an_incomplete_checkpoint_is_refused(resumed):
  _, _, root, log = resumed
  config, fresh, _, _ = worker.build()
  # A killed save copied as if it had finished (a non-atomic copy of the directory).
  killed = root / "killed"
  (interrupted,) = _interrupted(killed, log["kill_during"])
  os.rename(interrupted, killed / str(log["kill_during"]))
  # A finished checkpoint that lost its arrays, and one that lost its privacy record.
  no_arrays, no_record = root / "no_arrays", root / "no_record"
  for damaged, item in ((no_arrays, "state"), (no_record, "privacy")):
    shutil.copytree(root / "run", damaged)
    shutil.rmtree(os.path.join(_latest(damaged), item))
  for directory in (killed, no_arrays, no_record):
    with pytest.raises(ValueError, match="is incomplete or damaged"):
      clipjax.restore_checkpoint(directory, fresh, config)
  with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
    clipjax.restore_checkpoint(root / "empty", fresh, config)
  assert clipjax.restore_checkpoint(root / "empty", fresh, config, missing_ok=True) is fresh
