"""Sharding checks on simulated CPU devices, run by ``tests/test_sharding.py``.

A separate process because the device count is fixed when JAX starts, and the
pytest process has already started it with one device. By hand:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/_sharded_checks.py [ID ...]

It prints one JSON object, check id -> ``{"ok", "detail", "seconds"}``, where
``detail`` lists the collectives of the compiled program, or the error.

Most checks run in two styles, the id's suffix: ``[auto]`` (inputs placed with
``jax.device_put``, no mesh in context, so nothing about sharding is visible
while tracing and the partitioner infers everything) and ``[explicit]`` (an
``AxisType.Explicit`` mesh set with ``jax.set_mesh``: shardings are part of the
types). Some also run as ``[explicit_no_context]``: inputs on an Explicit mesh
(what ``jax.make_mesh`` builds by default) but no ``jax.set_mesh``, so only the
types carry the mesh and a bare ``PartitionSpec`` cannot be resolved. A check
passes when the jitted result equals the unsharded one, outputs keep the
inputs' shardings where they should, and the compiled program gathers nothing:
no collective but ``all-reduce``, and none larger than the reduced
value it has to carry (a scalar, one value per example, one example's sum).
"""

import contextlib
import json
import math
import os
import re
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import clipjax

DEVICES = 8
STYLES = ("auto", "explicit")
# Checks that also run without a mesh context: code that names a sharding needs one.
_ALSO_WITHOUT_CONTEXT = {
  "perturb_pytree",
  "vmap_rescale_batch_sharded",
  "dp_aggregate_masked_group_wise",
  "clipped_grad_tied_embedding_batch_sharded",
}
_COLLECTIVE = re.compile(
  r"=\s*(\S.*?)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
  r"(?:-start)?\("
)
# check id -> a function of no arguments returning the compiled program's collectives.
CHECKS = {}


def _register(name, body, styles=STYLES):
  if name in _ALSO_WITHOUT_CONTEXT:
    styles = (*styles, "explicit_no_context")
  for style in styles:
    CHECKS[f"{name}[{style}]"] = lambda body=body, style=style: body(style)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _mesh(style, shape, names):
  kind = AxisType.Explicit if style.startswith("explicit") else AxisType.Auto
  return jax.make_mesh(shape, names, axis_types=(kind,) * len(shape))


def _context(style, mesh):
  # The other styles leave the context empty on purpose: that is how most code
  # calls a library, and then a batching rule sees no mesh.
  return jax.set_mesh(mesh) if style == "explicit" else contextlib.nullcontext()


def _place(mesh, tree, specs):
  return jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), tree, specs)


def _elements(hlo_type):
  """Elements of an HLO type such as ``f32[16,4]{1,0}``; of the largest, for a tuple."""
  dims = re.findall(r"\b[a-z]+\d*\[([\d,]*)\]", hlo_type)
  return max(math.prod(int(n) for n in d.split(",") if n) for d in dims)


def _compile(fn, *args):
  """Compiles ``fn`` once; returns (its outputs on ``args``, its collectives)."""
  compiled = jax.jit(fn).lower(*args).compile()
  found = [(kind, t.strip(), _elements(t)) for t, kind in _COLLECTIVE.findall(compiled.as_text())]
  return compiled(*args), found


def _assert_gather_free(found, max_reduce):
  bad = [c for c in found if c[0] != "all-reduce" or c[2] > max_reduce]
  assert not bad, f"gathers or oversized reductions: {bad}"


def _assert_close(got, want, rtol=2e-5):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    # Sharded sums add in another order: an entry that cancels (a tied embedding's rows)
    # differs by float32 rounding of the leaf's largest terms, not of its own size.
    w = np.asarray(w)
    atol = max(1e-6, 1e-5 * float(np.max(np.abs(w), initial=0.0)))
    np.testing.assert_allclose(np.asarray(g), w, rtol=rtol, atol=atol)


def _assert_same_sharding(got, like):
  for g, a in zip(jax.tree.leaves(got), jax.tree.leaves(like), strict=True):
    assert g.sharding.is_equivalent_to(a.sharding, a.ndim), (g.sharding, a.sharding)


def _sharded_check(fn, data, mesh_shape, names, specs, *, max_reduce, keeps_sharding_of=None):
  """A check body: ``fn(*data)`` with ``data`` placed by ``specs``, as described above.

  ``keeps_sharding_of`` is the index of the argument whose shardings the outputs
  must have; ``max_reduce=None`` allows any collective. The unsharded reference
  is computed once, for every style.
  """
  reference = []

  def body(style):
    if not reference:
      reference.append(jax.jit(fn)(*data))
    mesh = _mesh(style, mesh_shape, names)
    with _context(style, mesh):
      placed = _place(mesh, data, specs)
      got, found = _compile(fn, *placed)
    _assert_close(got, reference[0])
    if keeps_sharding_of is not None:
      _assert_same_sharding(got, placed[keeps_sharding_of])
    if max_reduce is not None:
      _assert_gather_free(found, max_reduce)
    return found

  return body


# ---------------------------------------------------------------------------
# rescale, perturb, max_norm and the optax transformations on sharded vectors:
# a point in the unit box and a direction, as one array split along its
# feature axis, and as a pytree whose leaves are sharded differently.
# ---------------------------------------------------------------------------

_rng = np.random.default_rng(0)
_MESH_2D = ((4, 2), ("x", "y"))
_ARRAY = (
  _rng.uniform(size=(32, 256)).astype(np.float32),
  _rng.normal(size=(32, 256)).astype(np.float32),
)
_ARRAY_SPECS = (P(None, ("x", "y")),) * 2
_TREE = tuple(
  {
    "conv": draw(size=(64, 96)).astype(np.float32),
    "dense": draw(size=(48, 16)).astype(np.float32),
    "bias": draw(size=(10,)).astype(np.float32),
  }
  for draw in (_rng.uniform, _rng.normal)
)
_TREE_SPECS = ({"conv": P("x", "y"), "dense": P(None, "x"), "bias": P()},) * 2
_EPS = 3.0  # below the largest reachable norm of both inputs, so clipping matters


def _vector_check(name, fn, *, tree=True, keeps_sharding=False):
  data, specs = (_TREE, _TREE_SPECS) if tree else (_ARRAY, _ARRAY_SPECS)
  # Solvers and norms reduce to scalars: scalars are all that may cross devices.
  body = _sharded_check(
    fn, data, *_MESH_2D, specs, max_reduce=1, keeps_sharding_of=0 if keeps_sharding else None
  )
  _register(name, body)


def _transform(tx, with_params):
  def apply(params, updates):
    return tx.update(updates, tx.init(params), params if with_params else None)[0]

  return apply


# p = 2 is in every check after these two. The newton solver's program holds
# its bisection fallback too, so method="bisect" needs no check of its own.
for _p in (3.5, math.inf):
  _vector_check(f"rescale_pytree_p{_p}", lambda x, d, p=_p: clipjax.rescale(x, d, _EPS, p=p))
_vector_check(
  "rescale_grad_pytree",
  lambda x, d: jax.grad(lambda d: clipjax.rescale(x, d, _EPS))(d),
  keeps_sharding=True,
)
_vector_check(
  "perturb_array", lambda x, d: clipjax.perturb(x, d, _EPS), tree=False, keeps_sharding=True
)
_vector_check("perturb_pytree", lambda x, d: clipjax.perturb(x, d, _EPS), keeps_sharding=True)
_vector_check("max_norm_pytree", lambda x, d: clipjax.max_norm(x, d))
_vector_check(
  "clipping_aware_normalize_pytree",
  _transform(clipjax.clipping_aware_normalize(_EPS), with_params=True),
  keeps_sharding=True,
)
_vector_check(
  "clip_by_norm_pytree", _transform(clipjax.clip_by_norm(1.0), False), keeps_sharding=True
)
_vector_check(
  "clip_by_norm_pytree_p3", _transform(clipjax.clip_by_norm(1.0, p=3), False), keeps_sharding=True
)

# Array bounds sharded like x: the room of each coordinate is found shard-locally.
_register(
  "perturb_sharded_bounds",
  _sharded_check(
    lambda x, d, lo, hi: clipjax.perturb(x, d, 1.0, lower=lo, upper=hi),
    (*_ARRAY, _ARRAY[0] * 0.5, 0.5 + _ARRAY[0] * 0.5),
    *_MESH_2D,
    _ARRAY_SPECS * 2,
    max_reduce=1,
    keeps_sharding_of=0,
  ),
)

# The sort needs the whole vector in one place: it concatenates the leaves, so
# it gathers by design and only its result is checked.
_register(
  "rescale_sort_pytree",
  _sharded_check(
    lambda x, d: clipjax.rescale(x, d, _EPS, method="sort"),
    _TREE,
    *_MESH_2D,
    _TREE_SPECS,
    max_reduce=None,
  ),
)

# ---------------------------------------------------------------------------
# vmap(rescale) with per-example eps and the batch axis sharded
# ---------------------------------------------------------------------------

_BATCH = 16
_BATCHED = (
  _rng.uniform(size=(_BATCH, 8, 24)).astype(np.float32),
  _rng.normal(size=(_BATCH, 8, 24)).astype(np.float32),
  _rng.uniform(0.5, 4.0, size=_BATCH).astype(np.float32),
)


def _batched_check(name, fn, mesh, specs, keeps_sharding_of):
  # Per-row solver state crosses devices at most as one value per example.
  body = _sharded_check(
    fn, _BATCHED, *mesh, specs, max_reduce=_BATCH, keeps_sharding_of=keeps_sharding_of
  )
  _register(name, body)


_batched_check(
  "vmap_rescale_batch_sharded", jax.vmap(clipjax.rescale), ((8,), ("b",)), (P("b"),) * 3, 2
)
_batched_check(
  "vmap_rescale_batch_and_features_sharded",
  jax.vmap(clipjax.rescale),
  ((4, 2), ("b", "f")),
  (P("b", None, "f"), P("b", None, "f"), P("b")),
  2,
)

# ---------------------------------------------------------------------------
# Private SGD with the batch axis sharded
# ---------------------------------------------------------------------------

_GRADS = {
  "w": (_rng.normal(size=(32, 24, 10)) * np.linspace(0.1, 3, 32)[:, None, None]).astype(np.float32),
  "b": _rng.normal(size=(32, 10)).astype(np.float32),
}
_GRAD_SPECS = {"w": P("b"), "b": P("b")}
# A NaN example (zeroed, reported inf) and a mask (padding from index 28 on).
_BAD_GRADS = {"w": _GRADS["w"].copy(), "b": _GRADS["b"]}
_BAD_GRADS["w"][5, 0, 0] = np.nan
_MASK = np.arange(32) < 28
_GROUPS = {"w": 1.0, "b": 0.5}


def _privacy_check(name, fn, keeps_sharding=False, data=(_GRADS,), specs=(_GRAD_SPECS,)):
  # The only large collective allowed is the partitioner's sum over the batch:
  # one example's worth of values, never the per-example gradients.
  body = _sharded_check(
    fn,
    data,
    (DEVICES,),
    ("b",),
    specs,
    max_reduce=_GRADS["w"][0].size,
    keeps_sharding_of=0 if keeps_sharding else None,
  )
  _register(name, body)


def _masked_check(name, fn, keeps_sharding=False):
  """``fn(grads, mask)`` on the gradients with a NaN example, and a mask sharded alike."""
  _privacy_check(name, fn, keeps_sharding, (_BAD_GRADS, _MASK), (_GRAD_SPECS, P("b")))


def _aggregate(tx):
  def apply(grads, mask=None):
    updates, state = tx.update(grads, tx.init(None), mask=mask)
    return updates, getattr(state, "clip_norm", ())

  return apply


_privacy_check(
  "per_example_clip_batch_sharded", lambda g: clipjax.per_example_clip(g, 1.0)[0], True
)
_masked_check(
  "per_example_clip_masked_group_wise",
  lambda g, m: clipjax.per_example_clip(g, _GROUPS, scaling="automatic", mask=m)[0],
  True,
)
_masked_check(
  "dp_aggregate_masked_group_wise",
  # Noise before clipping is drawn per example, sharded like the batch.
  _aggregate(
    clipjax.dp_aggregate(
      _GROUPS, 0.8, jax.random.key(1), pre_clip_noise=0.3, expected_batch_size=30
    )
  ),
)
_masked_check(
  "adaptive_dp_aggregate_masked_group_wise",
  _aggregate(
    clipjax.adaptive_dp_aggregate(_GROUPS, 0.7, jax.random.key(2), expected_batch_size=30)
  ),
)
_masked_check(
  "clipping_stats_group_wise", lambda g, m: clipjax.clipping_stats(g, _GROUPS, p=1, mask=m)
)


def _adaptive_noise(summed, norms, mask):
  tx = clipjax.adaptive_dp_noise(_GROUPS, 0.7, 30, jax.random.key(3))
  updates, state = tx.update(summed, tx.init(None), norms=norms, mask=mask)
  return updates, state.clip_norm


_privacy_check(
  "adaptive_dp_noise_norms_sharded",
  _adaptive_noise,
  data=(
    {"w": _GRADS["w"][0], "b": _GRADS["b"][0]},
    {"w": _GRADS["b"][:, 0], "b": _GRADS["b"][:, 1]},
    _MASK,
  ),
  specs=({"w": P(), "b": P()}, {"w": P("b"), "b": P("b")}, P("b")),
)


def _microbatched(params, x, y, mask):
  """Clipped sums of a linear model over two micro-batches of the sharded batch."""

  def grad_fn(params, x, y, mask=None):
    loss = lambda p, x, y: -jax.nn.log_softmax(x @ p["w"] + p["b"])[y]
    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, x, y)
    clipped, norms = clipjax.per_example_clip(grads, 1.0, mask=mask)
    return jax.tree.map(lambda g: g.sum(0), clipped), norms

  return clipjax.microbatch(grad_fn, 2)(params, x, y, mask=mask)


_privacy_check(
  "microbatch_batch_sharded",
  _microbatched,
  data=(
    {"w": _rng.normal(size=(24, 10)).astype(np.float32), "b": np.zeros(10, np.float32)},
    _rng.normal(size=(32, 24)).astype(np.float32),
    _rng.integers(0, 10, 32).astype(np.int32),
    _MASK,
  ),
  specs=({"w": P(), "b": P()}, P("b"), P("b"), P("b")),
)
# Not ours, for comparison: optax 0.2.8's per-example clipping contracts the
# sharded batch axis with a plain dot, which explicit sharding rejects
# ("Contracting dimensions are sharded and it is ambiguous how the output
# should be sharded"); the auto style compiles to the same all-reduce as ours.
_privacy_check(
  "optax_per_example_global_norm_clip",
  lambda g: optax.per_example_global_norm_clip(list(g.values()), 1.0)[0],
)


# ---------------------------------------------------------------------------
# clipped_grad (ghost clipping) with the batch axis sharded, and with the
# parameters sharded too (FSDP style)
# ---------------------------------------------------------------------------


def _conv_loss(p, x, y):
  dims = ("NHWC", "HWIO", "NHWC")
  h = jax.lax.conv_general_dilated(x[None], p["k1"], (1, 1), "SAME", dimension_numbers=dims)[0]
  h = jax.nn.relu(h * p["scale"] + p["shift"])
  h = jax.lax.conv_general_dilated(h[None], p["k2"], (2, 2), "SAME", dimension_numbers=dims)[0]
  return -jax.nn.log_softmax(jnp.mean(jax.nn.relu(h), axis=(0, 1)) @ p["w"])[y]


def _lm_loss(p, tokens):
  """An embedding tied to the output projection, a residual MLP, learned positions."""
  h = jnp.tanh(p["emb"][tokens[:-1]] + p["pos"])
  h = h + jax.nn.relu(h @ p["w1"]) @ p["w2"]
  logits = h @ p["emb"].T
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[1:, None], 1))


_GHOST_MODELS = {
  # name: (loss, params, batch, FSDP specs of the parameters)
  "conv": (
    _conv_loss,
    {
      "k1": (0.3 * _rng.normal(size=(3, 3, 3, 8))).astype(np.float32),
      "scale": np.ones(8, np.float32),
      "shift": np.zeros(8, np.float32),
      "k2": (0.2 * _rng.normal(size=(3, 3, 8, 16))).astype(np.float32),
      "w": (0.3 * _rng.normal(size=(16, 10))).astype(np.float32),
    },
    (
      _rng.normal(size=(32, 8, 8, 3)).astype(np.float32),
      _rng.integers(0, 10, 32).astype(np.int32),
    ),
    {
      "k1": P(None, None, None, "p"),
      "scale": P(),
      "shift": P(),
      "k2": P(None, None, None, "p"),
      "w": P("p"),
    },
  ),
  "tied_embedding": (
    _lm_loss,
    {
      "emb": (0.3 * _rng.normal(size=(64, 16))).astype(np.float32),
      "pos": np.zeros((7, 16), np.float32),
      "w1": (0.2 * _rng.normal(size=(16, 32))).astype(np.float32),
      "w2": (0.2 * _rng.normal(size=(32, 16))).astype(np.float32),
    },
    (_rng.integers(0, 64, (32, 8)).astype(np.int32),),
    {"emb": P("p"), "pos": P(), "w1": P(None, "p"), "w2": P("p")},
  ),
}


def _ghost_reference(loss, params, batch):
  per_example = jax.vmap(jax.grad(loss), in_axes=(None,) + (0,) * len(batch))(params, *batch)
  return jax.tree.map(lambda g: g.sum(0), clipjax.per_example_clip(per_example, 1.0)[0])


def _ghost_batch_sharded(name):
  """Taps, records and cotangents stay sharded like the batch (nothing is gathered);
  the clipped sum is one all-reduce of at most the parameters' size."""
  loss, params, batch, _ = _GHOST_MODELS[name]

  def body(style):
    mesh = _mesh(style, (DEVICES,), ("b",))
    with _context(style, mesh):
      specs = (jax.tree.map(lambda _: P(), params),) + (P("b"),) * len(batch)
      placed = _place(mesh, (params, *batch), specs)
      (total, norms), found = _compile(clipjax.clipped_grad(loss, 1.0), *placed)
    _assert_close(total, _ghost_reference(loss, params, batch), rtol=1e-4)
    assert norms.sharding.spec[0] == "b", norms.sharding
    _assert_gather_free(found, sum(np.size(v) for v in jax.tree.leaves(params)))
    return found

  return body


def _parameter_gathers(found, params):
  """The all-gathers whose result has a parameter leaf's size (a gathered parameter or
  parameter-sized gradient)."""
  sizes = {np.size(v) for v in jax.tree.leaves(params)}
  return sorted(e for kind, _, e in found if kind == "all-gather" and e in sizes)


def _ghost_fsdp(name):
  """Batch over one mesh axis, parameters over the other: per-example norms are partial
  sums all-reduced over the parameter axis, and no parameter is gathered that the
  non-private step does not gather. (How the sums come out sharded is the automatic
  partitioner's choice, as it is for the non-private gradient.)"""
  loss, params, batch, param_specs = _GHOST_MODELS[name]

  def plain(p, *batch):
    return jax.grad(lambda p: jnp.sum(jax.vmap(loss, (None,) + (0,) * len(batch))(p, *batch)))(p)

  def body(style):
    mesh = _mesh(style, (4, 2), ("b", "p"))
    with _context(style, mesh):
      placed = _place(mesh, (params, *batch), (param_specs,) + (P("b"),) * len(batch))
      (total, _), found = _compile(clipjax.clipped_grad(loss, 1.0), *placed)
      _, plain_found = _compile(plain, *placed)
    _assert_close(total, _ghost_reference(loss, params, batch), rtol=1e-4)
    gathered = _parameter_gathers(found, params)
    assert gathered == _parameter_gathers(plain_found, params), (gathered, plain_found)
    per_example = [c for c in found if c[0] == "all-reduce" and re.search(r"f32\[8[],]", c[1])]
    assert per_example, f"no per-example partial sums reduced: {found}"
    return found

  return body


for _name in _GHOST_MODELS:
  _register(f"clipped_grad_{_name}_batch_sharded", _ghost_batch_sharded(_name))
  # Automatic axes only: under explicit ones the models themselves (an embedding
  # gathered from a sharded table by sharded ids) need out_sharding annotations.
  _register(f"clipped_grad_{_name}_fsdp", _ghost_fsdp(_name), styles=("auto",))

# ---------------------------------------------------------------------------
# The data-parallel DP-SGD example, in smoke mode
# ---------------------------------------------------------------------------


def _example_body(_):
  examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
  sys.path.insert(0, examples)
  import data_parallel_dp_sgd  # noqa: PLC0415 - a script, not part of the package

  with tempfile.TemporaryDirectory() as out:
    result = data_parallel_dp_sgd.main(["--smoke", "--out", out])
    assert os.path.getsize(result["plot"]) > 0
  assert result["devices"] == DEVICES, result["devices"]
  assert not result["gathers"], result["gathers"]
  assert result["accuracy"][-1] > 0.5, result["accuracy"]
  return result["collectives"]


_register("example_data_parallel_dp_sgd", _example_body, styles=("auto",))


def _summary(found):
  if found and isinstance(found[0], str):
    return found
  return sorted({f"{kind} {t}" for kind, t, _ in found})


def main(ids):
  if jax.device_count() != DEVICES:
    sys.exit(f"needs XLA_FLAGS=--xla_force_host_platform_device_count={DEVICES}")
  results = {}
  for check_id in ids or CHECKS:
    start = time.perf_counter()
    try:
      # Checks print (the example does); stdout carries only the JSON.
      with contextlib.redirect_stdout(sys.stderr):
        results[check_id] = {"ok": True, "detail": _summary(CHECKS[check_id]())}
    except Exception:  # noqa: BLE001 - reported to pytest, which fails the test
      results[check_id] = {"ok": False, "detail": traceback.format_exc(limit=-3)}
    results[check_id]["seconds"] = round(time.perf_counter() - start, 1)
  print(json.dumps(results))


if __name__ == "__main__":
  main(sys.argv[1:])
