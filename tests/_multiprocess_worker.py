"""One process of tests/test_multiprocess.py: a few DP-SGD steps on a sharded Poisson batch.

Run as ``python tests/_multiprocess_worker.py OUT PROCESS_ID NUM_PROCESSES PORT`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=D`` set by the caller. With one
process it runs the same steps on D local devices, without ``jax.distributed``. Writes
``OUT/process<ID>.npz``: the final parameters, the noise each step added (as seen on
this process), the collectives of the compiled step, and the outcome of a deliberately
failing key check.
"""

import os
import sys

NUM_SHARDS, SHARD_SIZE, SAMPLE_RATE, SHARD_BATCH = 4, 32, 0.25, 16
CLIP_NORM, NOISE_MULTIPLIER, STEPS = 0.5, 1.3, 5


def main(out, process_id, num_processes, port):
  import jax  # noqa: PLC0415 - the device count and collectives are set before JAX starts

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if num_processes > 1:
    jax.distributed.initialize(
      f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id
    )
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  import optax  # noqa: PLC0415
  from jax.sharding import NamedSharding  # noqa: PLC0415
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415

  import clipjax  # noqa: PLC0415

  sampler = clipjax.ShardedPoissonSampler(NUM_SHARDS, SHARD_SIZE, SAMPLE_RATE, SHARD_BATCH)
  rng = np.random.default_rng(0)
  x_all = rng.normal(size=(sampler.num_examples, 8)).astype(np.float32)
  y_all = rng.integers(0, 3, sampler.num_examples).astype(np.int32)
  mesh = jax.make_mesh((jax.device_count(),), ("batch",))
  batch_sharding, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
  shards = sampler.local_shards(batch_sharding)
  # This process reads only its own shards' rows.
  rows = slice(shards.start * SHARD_SIZE, shards.stop * SHARD_SIZE)
  local = (x_all[rows], y_all[rows])

  init = [
    {"w": (rng.normal(size=(m, n)) / np.sqrt(m)).astype(np.float32), "b": np.zeros(n, np.float32)}
    for m, n in ((8, 16), (16, 3))
  ]
  params = jax.tree.map(
    lambda a: jax.make_array_from_callback(a.shape, replicated, lambda i: a[i]), init
  )

  def example_loss(params, x, y):
    hidden = jnp.tanh(x @ params[0]["w"] + params[0]["b"])
    logits = hidden @ params[1]["w"] + params[1]["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)

  noise = clipjax.dp_noise(CLIP_NORM, NOISE_MULTIPLIER, sampler.expected_batch_size, key=7)
  tx = optax.chain(noise, optax.sgd(0.5))
  opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
  grad_fn = clipjax.clipped_grad(example_loss, CLIP_NORM)

  def step(params, opt_state, x, y, mask):
    summed, _ = grad_fn(params, x, y, mask=mask)
    # The same key and shapes as the update below: exactly the noise it adds, over B.
    added, _ = noise.update(jax.tree.map(jnp.zeros_like, summed), opt_state[0])
    updates, opt_state = tx.update(summed, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, added

  data_key = jax.random.key(11)
  batches = [
    sampler.global_batch(jax.random.fold_in(data_key, t), local, batch_sharding, debug=True)
    for t in range(STEPS)
  ]
  (x, y), mask = batches[0]
  # Compiled once, ahead of time, so that its collectives can be read.
  step = jax.jit(step, out_shardings=replicated).lower(params, opt_state, x, y, mask).compile()
  hlo = step.as_text()
  added_per_step = []
  for (x, y), mask in batches:
    params, opt_state, added = step(params, opt_state, x, y, mask)
    leaves = jax.tree.leaves(added)
    added_per_step.append(  # (local devices, parameters): every device's copy
      [
        np.concatenate([np.asarray(leaf.addressable_shards[d].data).ravel() for leaf in leaves])
        for d in range(jax.local_device_count())
      ]
    )
  clipjax.assert_same_across_processes(opt_state, "optimizer state")
  kinds = ("all-gather", "all-to-all", "all-reduce", "reduce-scatter", "collective-permute")
  found = sorted({k for k in kinds for line in hlo.splitlines() if f" {k}(" in line})
  try:  # a key that differs across processes must be caught
    clipjax.assert_same_across_processes(jax.random.key(jax.process_index()), "test key")
    caught = ""
  except ValueError as error:
    caught = str(error)
  leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(params)]
  np.savez(
    os.path.join(out, f"process{process_id}.npz"),
    *leaves,
    added=np.stack(added_per_step),
    collectives=np.array(found, dtype=str),
    caught=caught,
    shards=np.array(list(shards)),
  )
  if num_processes > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv[1], *map(int, sys.argv[2:5]))
