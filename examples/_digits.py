"""Shared helper for the examples: a small pure-JAX MLP on scikit-learn's digits.

The digits data ship with scikit-learn (1797 grey 8x8 images), so nothing is
downloaded and nothing is cached on disk. Pixels are scaled to [0, 1], the box the
examples perturb inputs in.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm


class Digits(NamedTuple):
  """Train and test split; images flattened to 64 float32 pixels in [0, 1]."""

  x_train: jax.Array
  y_train: jax.Array
  x_test: jax.Array
  y_test: jax.Array


def load(seed: int = 0, test_size: float = 0.25) -> Digits:
  """Loads the bundled digits, scaled to [0, 1], with a stratified split."""
  images, labels = load_digits(return_X_y=True)
  pixels = (images / 16.0).astype(np.float32)  # Raw values are 0..16.
  x_train, x_test, y_train, y_test = train_test_split(
    pixels, labels, test_size=test_size, random_state=seed, stratify=labels
  )
  return Digits(*(jnp.asarray(a) for a in (x_train, y_train, x_test, y_test)))


def init_mlp(key: jax.Array, sizes=(64, 128, 10)) -> list[dict]:
  """He-initialised dense layers, one ``{"w", "b"}`` dict per layer."""
  keys = jax.random.split(key, len(sizes) - 1)
  return [
    {
      "w": jax.random.normal(k, (m, n), jnp.float32) * jnp.sqrt(2.0 / m),
      "b": jnp.zeros(n, jnp.float32),
    }
    for k, m, n in zip(keys, sizes[:-1], sizes[1:])
  ]


def logits(params: list[dict], x: jax.Array) -> jax.Array:
  """Class scores of one image (64,) or a batch (..., 64)."""
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def loss(params: list[dict], x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean cross-entropy; ``y`` holds integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits(params, x), y).mean()


def accuracy(params: list[dict], x: jax.Array, y: jax.Array) -> float:
  """Fraction of images whose top class is the label."""
  return float(jnp.mean(jnp.argmax(logits(params, x), -1) == y))


def train(
  data: Digits,
  *,
  steps: int = 600,
  learning_rate: float = 3e-3,
  seed: int = 0,
  chunks: int = 20,
) -> list[dict]:
  """Full-batch Adam; the loop runs in ``chunks`` scans so tqdm can report."""
  optimizer = optax.adamw(learning_rate, weight_decay=1e-4)
  params = init_mlp(jax.random.key(seed))
  opt_state = optimizer.init(params)

  @functools.partial(jax.jit, static_argnums=2)
  def run(params, opt_state, n):
    def step(carry, _):
      params, opt_state = carry
      grads = jax.grad(loss)(params, data.x_train, data.y_train)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), length=n)
    return params, opt_state

  chunks = max(1, min(chunks, steps))
  sizes = np.full(chunks, steps // chunks)
  sizes[: steps % chunks] += 1
  for size in tqdm(sizes, desc="training MLP", unit="chunk"):
    params, opt_state = run(params, opt_state, int(size))
  return params


@functools.cache
def trained(seed: int = 0, steps: int = 600) -> tuple[Digits, list[dict]]:
  """The split and a model trained on it; examples sharing a process train once."""
  data = load(seed=seed)
  return data, train(data, steps=steps, seed=seed)
