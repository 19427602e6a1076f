"""``clipjax.ghost.plan``, the fallback warning and the public rule API.

``plan`` and the warning trace shapes only (nothing compiles); the user-registered rule
is checked against the float64 per-example oracle.
"""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _ghost_oracle import check
from jax import lax

import clipjax
from clipjax.privacy import ghost


def _normal(seed, shape, dtype=jnp.float64, scale=0.5):
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), dtype)


@jax.custom_vjp
def _custom(w, x):
  return x @ w


_custom.defvjp(lambda w, x: (x @ w, (w, x)), lambda r, g: (r[1].T @ g, g @ r[0].T))


def _fallback_model():
  """One leaf per way of falling back, plus a recognised one and an unused one."""
  params = {
    name: _normal(i, (4, 4))
    for i, name in enumerate(
      ["dense", "sin", "bias", "cond", "custom", "carry", "columns", "unused"]
    )
  }

  def loss(p, x, ids):
    h = jnp.tanh(x @ p["dense"])  # ghost
    h = h @ jnp.sin(p["sin"])  # transformed before use: explicit, pulled back
    h = h + p["bias"][0]  # an elementwise shift: no rule
    h = lax.cond(jnp.sum(x) > 0, lambda h: h @ p["cond"], lambda h: h, h)
    h = _custom(p["custom"], h)
    h, _ = lax.scan(lambda c, _: (jnp.tanh(c @ (h.T @ h)), None), p["carry"], length=2)
    return jnp.sum(jnp.tanh(h)) + jnp.sum(p["columns"][:, ids])  # a column gather

  x = _normal(20, (3, 2, 4))
  ids = jnp.asarray(np.random.default_rng(21).integers(0, 4, (3, 2)), jnp.int32)
  return loss, params, (x, ids)


_REASONS = {
  "['cond']": "used inside `cond` (branches are not analysed)",
  "['custom']": "used inside a `custom_vjp` function (its gradient is its own)",
  "['carry']": "carried through a `scan`",
  "['columns']": "`gather` use not recognised by its rule (Embedding)",
}


def test_plan_reports_every_fallback_with_its_reason():
  loss, params, batch = _fallback_model()
  report = ghost.plan(loss, params, *batch)
  assert list(report) == [
    jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)
  ]
  assert report["['dense']"] == ghost.LeafPlan(
    "ghost", (ghost.UsePlan("dot_general", "DotGeneral", "ghost"),), ()
  )
  assert report["['sin']"] == ghost.LeafPlan(
    "explicit", (ghost.UsePlan("dot_general", "DotGeneral", "explicit", ("sin",)),), ()
  )
  assert report["['unused']"] == ghost.LeafPlan("unused", (), ())
  by_design = "elementwise `add` with data (a small per-example gradient, by design)"
  assert report["['bias']"] == ghost.LeafPlan("pass", (), (by_design,))
  for path, reason in _REASONS.items():
    assert report[path].form == "pass", path
    assert reason in report[path].reasons, (path, report[path].reasons)


def test_fallback_warning_names_leaves_and_reasons():
  loss, params, batch = _fallback_model()
  with pytest.warns(ghost.FallbackWarning) as record:
    ghost.plan(loss, params, *batch, warn=True)
  message = str(record[0].message)
  for path, reason in _REASONS.items():
    assert f"{path}: " in message and reason in message
  assert not any(f"{p}: " in message for p in ("['dense']", "['sin']", "['unused']", "['bias']"))


def test_clipped_grad_warns_on_fallback_only_when_asked():
  params = {"w": _normal(1, (3, 2)), "b": _normal(2, (2,))}
  x = _normal(3, (4, 3), jnp.float32)
  loss = lambda p, x: jnp.sum(jnp.tanh(_custom(p["w"], x[None]) + p["b"]))
  with pytest.warns(
    ghost.FallbackWarning, match=r"1 leaves[^[]*\['w'\]: used inside a `custom_vjp`"
  ):
    clipjax.clipped_grad(loss, 1.0, warn_fallback=True)(params, x)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    clipjax.clipped_grad(loss, 1.0)(params, x)


class _Scale(ghost.Rule):
  """``x * w`` (``lax.mul`` broadcasts ``w``'s unit axes): ``G_i[h] = Σ_p x_i[p, h] g_i[p, h]``
  over the positions ``p`` that ``w`` is broadcast along; ``L = R = 1``."""

  def match(self, eqn, kinds):
    return kinds.index("view") if sorted(kinds) == ["data", "view"] else None

  def arrange(self, eqn, position, operand):
    return operand.reshape(-1, 1, 1)

  def factors(self, eqn, position, data, g):
    w = eqn.invars[position].aval.shape
    spread = [a for a, (n, m) in enumerate(zip(w, g.shape)) if n == 1 and m > 1]
    kept = [a for a in range(g.ndim) if a not in spread]
    x = jnp.broadcast_to(data[0], g.shape)
    x, g = (v.transpose(kept + spread).reshape(math.prod(w), -1, 1) for v in (x, g))
    return x, g


def test_user_registered_rule_takes_effect_and_is_exact():
  params = {"w": _normal(1, (6, 5)), "gain": _normal(2, (5,)) + 1, "mask": _normal(3, (4, 5))}
  x = _normal(4, (7, 4, 6))

  def loss(p, x):
    h = jnp.tanh(x @ p["w"]) * p["gain"]  # broadcast along the positions
    return jnp.sum(jnp.sin(h * p["mask"]))  # the output's shape

  assert ghost.rule_for(lax.mul_p) is None
  assert ghost.plan(loss, params, x)["['gain']"].form == "pass"
  ghost.register_rule(lax.mul_p, _Scale())
  try:
    report = ghost.plan(loss, params, x)
    for path in ("['gain']", "['mask']"):
      assert report[path].form != "pass"
      assert [u.rule for u in report[path].uses] == ["_Scale"]
    check(loss, params, x, clip_norms=(1e-3, 1e3))
  finally:
    ghost.register_rule(lax.mul_p, None)
  assert ghost.rule_for(lax.mul_p) is None


def test_register_rule_checks_its_arguments():
  with pytest.raises(TypeError, match="primitive"):
    ghost.register_rule("mul", _Scale())
  with pytest.raises(TypeError, match="rule"):
    ghost.register_rule(lax.mul_p, object())


@pytest.mark.calibrated_costs
def test_cost_weights_are_the_recorded_calibration():
  """The CPU weights of the per-use choice are the ones the calibration recorded
  (``python -m benchmarks.ghost_bench --calibrate``); with them the measured cheaper form
  is chosen on every calibration shape where the two times differ by 1.5x, and on all
  but one shape overall."""
  import json
  import pathlib

  from clipjax.privacy.ghost import _cost

  path = pathlib.Path(__file__).parents[1] / "benchmarks" / "results" / "cpu-ghost-costs.json"
  recorded = json.loads(path.read_text())
  w = _cost.CALIBRATED["cpu"]
  for name, value in recorded["weights"].items():
    assert getattr(w, name) == float(f"{value:.3g}"), name
  assert _cost.weights("no such backend") == _cost.UNIT
  wrong = 0
  for row in recorded["rows"]:
    _, blocks, positions, size_l, size_r = row["shape"]
    shape = (blocks, positions, size_l, size_r)
    right = (_cost.gram(*shape, w) < _cost.explicit(*shape, w)) == (row["gram"] < row["explicit"])
    wrong += not right
    assert right or max(row["gram"], row["explicit"]) < 1.5 * min(row["gram"], row["explicit"])
  assert wrong <= 1


@pytest.mark.calibrated_costs
@pytest.mark.parametrize("positions", [64, 256])
def test_calibrated_weights_choose_the_form_and_stay_exact(positions, monkeypatch):
  """A dense layer 128 -> 512 (a transformer's MLP): this CPU's measured weights favour
  the explicit form (whose contraction serves the clipped sum too), which is taken on
  256 positions; on 64 its per-example gradients (65536 entries) would outgrow the
  factors (40960), so the memory budget (its floor lifted) keeps the Gram form. Either
  is exact."""
  from clipjax.privacy.ghost import _cost

  monkeypatch.setattr(_cost, "FLOOR", 0)
  shape = (1, positions, 128, 512)
  w = _cost.weights()
  measured = _cost.gram(*shape, w) < _cost.explicit(*shape, w)
  held = _cost.held(4 * 128 * 512, 4 * positions * (128 + 512))
  params = {"w": _normal(1, shape[2:])}
  x = _normal(2, (4, positions, 128))
  loss = lambda p, x: jnp.sum(jnp.tanh(x @ p["w"]) ** 2)
  form = "explicit" if held and not measured else "ghost"
  assert ghost._plan(loss, params, x)["['w']"] == (form,)
  if jax.default_backend() == "cpu":
    assert not measured and held == (positions == 256)
  check(loss, params, x)
