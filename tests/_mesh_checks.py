"""Checks on 8 simulated CPU devices; run by tests/test_mesh.py in a subprocess.

Every check compares the sharded result with the unsharded one and inspects the
compiled program for all-gathers (all-reduces of per-row scalars are expected).
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import clipjax  # noqa: E402

jax.config.update("jax_enable_x64", True)
RESULTS = []


def check(name, fn, args, want, out_sharding_of=None):
  """Runs jitted ``fn`` on sharded ``args``: equal to ``want``, no all-gather."""
  compiled = jax.jit(fn).lower(*args).compile()
  hlo = compiled.as_text()
  got = compiled(*args)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-9, atol=1e-12, err_msg=name)
  assert "all-gather" not in hlo, f"{name}: the compiled program gathers"
  if out_sharding_of is not None:
    for g, a in zip(jax.tree.leaves(got), jax.tree.leaves(out_sharding_of)):
      assert g.sharding.is_equivalent_to(a.sharding, g.ndim), f"{name}: output sharding changed"
  RESULTS.append((name, "all-reduce" in hlo))


def data(rng):
  x = {"w": rng.uniform(0, 1, (64, 128)), "b": rng.uniform(0, 1, (1024,))}
  d = jax.tree.map(lambda v: rng.standard_normal(v.shape), x)
  batch_x = rng.uniform(0, 1, (16, 1024))
  batch_d = rng.standard_normal((16, 1024))
  grads = {"w": rng.standard_normal((16, 32, 8)), "b": rng.standard_normal((16, 8))}
  grads["w"][3] *= 100.0
  return x, d, batch_x, batch_d, grads


def run_all(mesh, place):
  rng = np.random.default_rng(0)
  x, d, bx, bd, grads = data(rng)
  eps = jnp.linspace(0.5, 8.0, 16)
  vec = lambda v: place(v, P("d") if v.ndim == 1 else P(None, "d"))
  xs, ds = jax.tree.map(vec, x), jax.tree.map(vec, d)
  for p in [1.0, 2.0, jnp.inf]:
    check(f"rescale p={p}", lambda x, d: clipjax.rescale(x, d, 3.0, p=p), (xs, ds), clipjax.rescale(x, d, 3.0, p=p))
    check(f"perturb p={p}", lambda x, d: clipjax.perturb(x, d, 3.0, p=p), (xs, ds),
          clipjax.perturb(x, d, 3.0, p=p), out_sharding_of=xs)
    check(f"max_norm p={p}", lambda x, d: clipjax.max_norm(x, d, p=p), (xs, ds), clipjax.max_norm(x, d, p=p))
    row = lambda x, d, e: jax.vmap(lambda a, b, c: clipjax.rescale(a, b, c, p=p))(x, d, e)
    check(f"vmap(rescale) batch-sharded p={p}", row,
          (place(bx, P("d", None)), place(bd, P("d", None)), place(eps, P("d"))), row(bx, bd, eps))
  clip = clipjax.clip_by_norm(1.0)
  check("clip_by_norm", lambda u: clip.update(u, optax.EmptyState())[0], (ds,),
        clip.update(d, optax.EmptyState())[0], out_sharding_of=ds)
  normalize = clipjax.clipping_aware_normalize(2.0)
  check("clipping_aware_normalize", lambda u, x: normalize.update(u, optax.EmptyState(), x)[0], (ds, xs),
        normalize.update(d, optax.EmptyState(), x)[0], out_sharding_of=ds)
  batch = jax.tree.map(lambda v: place(v, P("d", *([None] * (v.ndim - 1)))), grads)
  check("per_example_clip", lambda g: clipjax.per_example_clip(g, 1.0), (batch,), clipjax.per_example_clip(grads, 1.0))
  params = jax.tree.map(lambda v: jnp.zeros(v.shape[1:]), grads)
  for name, tx in [
      ("dp_aggregate", clipjax.dp_aggregate(1.0, 0.5, 0, pre_clip_noise=0.1)),
      ("adaptive_dp_aggregate", clipjax.adaptive_dp_aggregate(1.0, 0.5, 0)),
  ]:
    state = tx.init(params)
    check(name, lambda g, s: tx.update(g, s, params)[0], (batch, state), tx.update(grads, state, params)[0])


def main():
  assert jax.device_count() == 8
  devices = np.array(jax.devices())
  auto = jax.sharding.Mesh(devices, ("d",))
  run_all(auto, lambda v, spec: jax.device_put(v, NamedSharding(auto, spec)))
  explicit = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(explicit):
    run_all(explicit, lambda v, spec: jax.device_put(v, NamedSharding(explicit, spec)))
  for name, reduces in RESULTS:
    print(f"OK {name}: {'all-reduce' if reduces else 'no collective'}")
  print(f"{len(RESULTS)} sharded checks passed")


if __name__ == "__main__":
  main()
