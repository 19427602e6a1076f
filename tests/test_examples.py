"""Smoke runs of the examples: outputs exist and the headline numbers make sense."""

import math
import os

import jax
import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.fixture(autouse=True)
def _examples_on_path(monkeypatch):
  # The examples import their shared helper as a sibling module, as they do
  # when run as scripts.
  monkeypatch.syspath_prepend(EXAMPLES)


def _main(module_name, tmp_path):
  """Imports an example as its script would see itself and runs its smoke configuration."""
  return __import__(module_name).main(["--smoke", "--out", str(tmp_path)])


def _run(module_name, tmp_path, capsys):
  result = _main(module_name, tmp_path)
  assert os.path.getsize(result["plot"]) > 0
  assert os.path.dirname(result["plot"]) == str(tmp_path)
  return result, capsys.readouterr().out


def test_noise_robustness(tmp_path, capsys):
  result, out = _run("noise_robustness", tmp_path, capsys)
  assert "claimed" in out and "naive true" in out
  assert result["clean_accuracy"] > 0.8
  for row in result["rows"]:
    # Exact noise has the claimed size for every image; naive noise is smaller.
    assert row["exact_size"] == pytest.approx(row["eps"], rel=1e-4)
    assert row["exact_min_size"] == pytest.approx(row["eps"], rel=1e-4)
    assert row["naive_size"] < row["eps"] * (0.9 if row["norm"] == "L2" else 1.0)
    # Noise does not make the classifier better, and leaves it far above chance (0.1).
    for acc in (row["naive_acc"], row["exact_acc"]):
      assert 0.3 < acc <= result["clean_accuracy"] + 0.02
  # At the largest L2 size the exact noise, being larger, costs more accuracy.
  largest = max((r for r in result["rows"] if r["norm"] == "L2"), key=lambda r: r["eps"])
  assert largest["exact_acc"] < largest["naive_acc"]


def test_pgd_attack(tmp_path, capsys):
  result, out = _run("pgd_attack", tmp_path, capsys)
  assert "step/alpha" in out
  rows = {(r["variant"], r["eps"]): r for r in result["rows"]}
  for (variant, eps), row in rows.items():
    assert row["max_final_norm"] <= eps * (1 + 1e-5)
    assert row["success"] > 0.5  # of the correctly classified images: the attack works
    if variant == "clipping-aware step":
      assert row["step_ratio_min"] == pytest.approx(1.0, rel=1e-4)
      assert row["step_ratio_max"] == pytest.approx(1.0, rel=1e-4)
    else:
      assert row["step_ratio"] < 0.95
    naive = rows[("normalize, project, clip", eps)]
    exact = rows[("normalize, exact projection", eps)]
    # Project-then-clip wastes budget; the exact projection spends all of it.
    assert exact["final_norm"] == pytest.approx(eps, rel=1e-4)
    assert naive["final_norm"] < exact["final_norm"]


def test_clipped_sgd_least_squares(tmp_path, capsys):
  result, out = _run("clipped_sgd_least_squares", tmp_path, capsys)
  assert "best clipped / best plain" in out
  for r in result["results"].values():
    # Starting from w = 0 the excess risk is about 0.5; the best runs learn.
    assert 0.0 < r["plain"] < 0.5 and 0.0 < r["clipped"] < 0.5
    assert math.isclose(r["ratio"], r["clipped"] / r["plain"])


def test_clipping_bias(tmp_path):
  results = _main("clipping_bias", tmp_path)
  assert (tmp_path / "clipping_bias.png").stat().st_size > 0
  for mc, err, exact in results.values():
    # 1e-4 absorbs float32 rounding in the sum of 40,000 terms.
    assert np.all(np.abs(mc - exact) <= 6 * err + 1e-4)
  # Without perturbation x = 1 looks stationary; k = 1 points back to 0.
  module = __import__("clipping_bias")
  at_one = list(np.unique(np.concatenate([np.linspace(-4, 4, 17), module.TABLE_XS]))).index(1.0)
  assert results[0.0][0][at_one] == 0.0
  mc, err, _ = results[1.0]
  assert abs(mc[at_one] - 0.0413) < 6 * err[at_one] + 1e-4


def test_dp_sgd(tmp_path, capsys):
  result, out = _run("dp_sgd", tmp_path, capsys)
  assert "adding or removing one training example" in out and "audit" in out
  sampler = result["sampler"]
  assert sampler.accounting["sampling"] == "poisson"
  assert sampler.overflow_probability * 1_000 < 1e-5
  (row,) = result["rows"]
  # The noise meets the target for the sampler that ran, by both accountants.
  assert row["epsilon_pld"] <= row["target"] * (1 + 1e-9) < row["epsilon_rdp"]
  assert row["epsilon_curve"][-1] == pytest.approx(row["epsilon_pld"])
  # The audit certifies a lower bound that the claim must exceed.
  assert 0.0 <= row["audit_epsilon"] < row["one_step_epsilon"]
  # The private model learns (chance is 0.1) and does not beat the non-private one.
  assert result["baseline"][-1] > 0.5
  assert 0.3 < row["accuracy"][-1] < result["baseline"][-1] + 0.05


def test_adversarial_training(tmp_path, capsys):
  result, out = _run("adversarial_training", tmp_path, capsys)
  assert "budget" in out and "clean" in out
  rows = {r["method"]: r for r in result["rows"]}
  assert {"plain", "PGD-L2 clipjax", "PGD-L2 usual"} <= set(rows)
  for r in rows.values():
    attacked = [r["L2 usual attack"], *r["L2"].values(), *r["Linf"].values()]
    assert all(a < r["clean"] for a in attacked), r  # the attacks cost accuracy
  assert rows["plain"]["clean"] > 0.5
  # Adversarial training buys robustness at the training eps.
  robust = min(min(rows[m]["L2"].values()) for m in ("PGD-L2 clipjax", "PGD-L2 usual"))
  assert robust > max(rows["plain"]["L2"].values())
  # clipjax.pgd's training perturbations use (nearly) all of eps; the usual recipe's
  # are shortened by clipping.
  assert rows["PGD-L2 clipjax"]["budget_used"] > 0.99
  assert rows["PGD-L2 usual"]["budget_used"] < rows["PGD-L2 clipjax"]["budget_used"]


def test_universal_perturbation(tmp_path, capsys):
  result, out = _run("universal_perturbation", tmp_path, capsys)
  assert "exact fool" in out and "naive fool" in out
  for r in result["rows"]:
    # Every exactly perturbed image is eps away after clipping; naive ones are closer.
    for size in ("exact_size", "exact_min_size", "exact_max_size"):
      assert r[size] == pytest.approx(r["eps"], rel=1e-4)
    assert r["naive_size"] < r["eps"] and r["naive_max_size"] <= r["eps"] * (1 + 1e-5)
    assert r["exact_matched_max_error"] <= 1e-4 * r["eps"]
    for fool in ("exact_fool", "naive_fool", "exact_matched_fool"):
      # A learned perturbation fools several times what random noise of its size does.
      assert 0.05 < r[fool] < 1.0
  # The derivative through the scale is exact; holding the scale constant is not.
  assert result["gradient_error"] < 1e-6
  assert result["held_scale_error"] > 1e-2


def test_clipping_rules(tmp_path, capsys):
  result, out = _run("clipping_rules", tmp_path, capsys)
  assert "final test accuracy" in out
  assert result["epsilon"] <= 2.0 * (1 + 1e-9)
  for name, r in result["results"].items():
    assert r["sensitivity"] == pytest.approx(1.0, rel=1e-6), name
    assert all(a > 0.3 for a in r["final"]), name  # learned: chance is 0.1
    if r["adaptive"]:  # the clip norms moved, and stayed positive and finite
      assert all(0 < c < math.inf for c in jax.tree.leaves(r["clip_norms"][0]))
