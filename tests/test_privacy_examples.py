"""Smoke runs of the private-SGD examples (tiny configurations)."""

import importlib.util
import pathlib

import numpy as np
import pytest

_EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name):
  spec = importlib.util.spec_from_file_location(name, _EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_clipping_bias_smoke(tmp_path):
  results = _load("clipping_bias").main(["--smoke", "--out", str(tmp_path)])
  assert (tmp_path / "clipping_bias.png").stat().st_size > 0
  for mc, err, exact in results.values():
    # 1e-4 absorbs float32 rounding in the sum of 40,000 terms.
    assert np.all(np.abs(mc - exact) <= 6 * err + 1e-4)
  # Without perturbation x = 1 looks stationary; k = 1 points back to 0.
  module = _load("clipping_bias")
  at_one = list(np.unique(np.concatenate([np.linspace(-4, 4, 17), module.TABLE_XS]))).index(1.0)
  assert results[0.0][0][at_one] == 0.0
  mc, err, _ = results[1.0]
  assert abs(mc[at_one] - 0.0413) < 6 * err[at_one] + 1e-4


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dp_sgd_smoke(tmp_path):
  histories = _load("dp_sgd").main(["--smoke", "--out", str(tmp_path)])
  assert (tmp_path / "dp_sgd.png").stat().st_size > 0
  assert len(histories) == 3
  epsilons = {h["epsilon"][-1] for h in histories.values()}
  assert len(epsilons) == 1 and 0 < epsilons.pop() <= 3.0 + 1e-9
  for h in histories.values():
    assert len(h["accuracy"]) == 2
    assert all(np.isfinite(v) for v in h["bias_norm"])
