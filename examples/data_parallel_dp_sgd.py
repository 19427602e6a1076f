"""Data-parallel DP-SGD: the batch sharded over every device, parameters replicated.

A small pure-JAX MLP (64-64-10, tanh) learns scikit-learn's bundled digits with
DP-SGD. Each step takes per-example gradients with ``jax.vmap(jax.grad(...))``
and aggregates them with :func:`clipjax.dp_aggregate` (clip every example to
norm C, sum, add Gaussian noise of standard deviation σ·C, divide by the batch
size). The batch lives on a one-axis mesh over ``jax.devices()``, laid out with
a ``NamedSharding``; parameters and optimizer state are replicated. Nothing is
written with ``shard_map``: ``jax.jit`` partitions the step, every device clips
its own examples, and the sum over the batch becomes one all-reduce of a
parameter-sized vector. The script prints the step's collectives and checks
that none gathers the batch.

The same code runs on one CPU, on several GPUs or TPUs, and across hosts. On a
multi-host cluster, start the script on every host with ``--distributed``, which
calls ``jax.distributed.initialize()`` before anything else touches JAX: on
Cloud TPU, Kubernetes, SLURM and Open MPI it finds the coordinator, the process
count and its own rank by itself; elsewhere pass them to that call
(``coordinator_address=``, ``num_processes=``, ``process_id=``). ``jax.devices()``
then lists every device of every host; each process draws the same permutation
from the same seed and builds only its own devices' shards of each batch
(``jax.make_array_from_callback``; with data too large for every host to hold,
load each host's part and use ``jax.make_array_from_process_local_data``). Only
process 0 prints and plots.

To see the sharding on one machine, simulate devices on the CPU. The device count
is fixed when JAX starts, so it is set from outside, not by the script (which
would otherwise also override it for anyone who imports it, or on a machine
with real accelerators):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/data_parallel_dp_sgd.py

    python examples/data_parallel_dp_sgd.py [--out examples/out] [--epochs 30] [--smoke]
"""

import argparse
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import clipjax

SIZES = (64, 64, 10)


def load_data(smoke):
  images, labels = load_digits(return_X_y=True)
  pixels = (images / 16.0).astype(np.float32)
  x_train, x_test, y_train, y_test = train_test_split(
    pixels, labels, test_size=0.2, random_state=0, stratify=labels
  )
  if smoke:
    x_train, y_train = x_train[:512], y_train[:512]
  return x_train, y_train.astype(np.int32), x_test, y_test.astype(np.int32)


def init_params(seed):
  # NumPy on the host: every process draws the same values from the same seed.
  rng = np.random.default_rng(seed)
  return [
    {
      "w": (rng.normal(size=(m, n)) * np.sqrt(1 / m)).astype(np.float32),
      "b": np.zeros(n, np.float32),
    }
    for m, n in zip(SIZES[:-1], SIZES[1:])
  ]


def logits(params, x):
  for layer in params[:-1]:
    x = jnp.tanh(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def example_loss(params, x, y):
  """Cross-entropy of one example."""
  return -jax.nn.log_softmax(logits(params, x))[y]


def per_example_grads(params, x, y):
  """Every leaf gets the batch as its leading axis, sharded like ``x``."""
  return jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(params, x, y)


def make_step(optimizer):
  def step(params, opt_state, x, y):
    grads = per_example_grads(params, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return jax.jit(step, donate_argnums=(0, 1))


@jax.jit
def accuracy(params, x, y):
  return jnp.mean(jnp.argmax(logits(params, x), axis=-1) == y)


def place(tree, sharding):
  """Puts host (NumPy) arrays on the mesh; each process builds only its own shards."""
  return jax.tree.map(
    lambda a: jax.make_array_from_callback(a.shape, sharding, lambda index: a[index]), tree
  )


def collectives(compiled_text):
  """``kind shape`` of every collective in an HLO module's text."""
  found = set()
  for line in compiled_text.splitlines():
    for kind in ("all-gather", "all-reduce", "all-to-all", "reduce-scatter", "collective-permute"):
      if f" {kind}(" in line or f" {kind}-start(" in line:
        found.add(f"{kind} {line.split('=', 1)[1].split(kind)[0].strip()}")
  return sorted(found)


def plot(history, path, title):
  import matplotlib  # noqa: PLC0415 - only the plotting process needs it

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot(range(1, len(history) + 1), history, marker="o")
  ax.set_xlabel("epoch")
  ax.set_ylabel("test accuracy")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
  parser.add_argument("--epochs", type=int, default=30)
  parser.add_argument(
    "--batch-size", type=int, default=256, help="rounded up to a multiple of the device count"
  )
  parser.add_argument("--clip-norm", type=float, default=1.0)
  parser.add_argument("--noise-multiplier", type=float, default=1.0)
  parser.add_argument("--learning-rate", type=float, default=1e-2)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--smoke", action="store_true", help="a few epochs on a subset, for tests")
  parser.add_argument(
    "--distributed", action="store_true", help="call jax.distributed.initialize() (multi-host)"
  )
  args = parser.parse_args(argv)
  if args.smoke:
    args.epochs, args.batch_size = 3, 64
  return args


def main(argv=None):
  args = parse_args(argv)
  if args.distributed:
    jax.distributed.initialize()
  devices = jax.devices()
  if jax.process_index() == 0:
    print(f"{len(devices)} device(s) on {jax.process_count()} process(es): {devices}")
  # make_mesh's axes are Explicit: shardings are part of the arrays' types, and
  # every jit traced inside the mesh context sees them.
  mesh = jax.make_mesh((len(devices),), ("batch",), devices=devices)
  batch_size = math.ceil(args.batch_size / len(devices)) * len(devices)
  with jax.set_mesh(mesh):
    history, found = train(
      args, batch_size, NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
    )
  gathers = [c for c in found if not c.startswith("all-reduce")]
  path = os.path.join(args.out, "data_parallel_dp_sgd.png")
  if jax.process_index() == 0:
    os.makedirs(args.out, exist_ok=True)
    title = (
      f"DP-SGD on digits, batch sharded over {len(devices)} device(s)\n"
      f"C = {args.clip_norm}, σ = {args.noise_multiplier}, batch {batch_size}"
    )
    plot(history, path, title)
    print(f"plot: {path}")
  return {
    "devices": len(devices),
    "accuracy": history,
    "collectives": found,
    "gathers": gathers,
    "plot": path,
  }


def train(args, batch_size, batch_sharding, replicated):
  """Trains; returns (test accuracy per epoch, the compiled step's collectives)."""
  lead = jax.process_index() == 0
  devices = batch_sharding.mesh.size
  x_train, y_train, x_test, y_test = load_data(args.smoke)
  steps_per_epoch = len(x_train) // batch_size

  optimizer = optax.chain(
    clipjax.dp_aggregate(args.clip_norm, args.noise_multiplier, jax.random.key(args.seed)),
    optax.adam(args.learning_rate),
  )
  params = place(init_params(args.seed), replicated)
  # init builds the state from replicated params, so it is replicated too.
  opt_state = jax.jit(optimizer.init)(params)
  test = place((x_test, y_test), replicated)  # small: every device scores all of it

  def batch(indices):
    return place((x_train[indices], y_train[indices]), batch_sharding)

  # Compiled ahead of time, so its program can be inspected: the same one runs.
  step = make_step(optimizer).lower(params, opt_state, *batch(np.arange(batch_size))).compile()
  found = collectives(step.as_text())
  if lead:
    print(f"batch {batch_size} = {devices} devices x {batch_size // devices} examples")
    print("collectives in the compiled step:", found or "none (one device)")
    print("no all-gather of the batch:", all(c.startswith("all-reduce") for c in found))

  rng = np.random.default_rng(args.seed)
  history = []
  epochs = tqdm(range(args.epochs), desc="DP-SGD", disable=not lead)
  for epoch in epochs:
    order = rng.permutation(len(x_train))
    for k in range(steps_per_epoch):
      params, opt_state = step(
        params, opt_state, *batch(order[k * batch_size : (k + 1) * batch_size])
      )
    history.append(float(accuracy(params, *test)))
    epochs.set_postfix(accuracy=f"{history[-1]:.3f}")
    if lead:
      epochs.write(f"epoch {epoch + 1:3d}  test accuracy {history[-1]:.3f}")

  return history, found


if __name__ == "__main__":
  main()
