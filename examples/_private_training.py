"""Shared helper for the DP-SGD examples: Poisson batches, a clipping rule, noise, Adam.

One training step is what the accounting assumes: a :class:`clipjax.PoissonSampler`
batch (padded, with a mask), :func:`clipjax.clipped_grad` under the rule's clip norm
and scaling, Gaussian noise on the sum divided by the EXPECTED batch size
(:func:`clipjax.dp_noise`, or :func:`clipjax.adaptive_dp_noise` whose state carries the
clip norm of the next step), then Adam. Epochs run as one compiled ``lax.scan`` each,
sampling inside it.
"""

from typing import Any, NamedTuple

import _cli
import _digits
import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

import clipjax

DELTA = 1e-5


class Rule(NamedTuple):
  """How examples are clipped: a clip norm (or a list of one per layer), a scaling rule,
  and whether the clip norms adapt (then ``clip_norm`` is their initial value)."""

  name: str
  clip_norm: Any = 1.0
  scaling: str = "clip"
  adaptive: bool = False


def arguments(doc):
  """A parser with the options both DP-SGD examples share: output folder, schedule, smoke."""
  parser = _cli.parser(doc, seed=False)
  parser.add_argument("--epochs", type=int, default=40)
  parser.add_argument("--batch-size", type=int, default=64, help="the expected batch size")
  parser.add_argument("--learning-rate", type=float, default=3e-3)
  return parser


def example_loss(params, x, y):
  """Cross-entropy of ONE example: the loss that ``clipped_grad`` clips."""
  return optax.softmax_cross_entropy_with_integer_labels(_digits.logits(params, x), y)


def poisson_sampler(num_examples, expected_batch, steps):
  """Poisson batches of the expected size, padded so that the whole run overflows with
  probability β below δ·10⁻⁷. The accountants are told the padding either way; RDP's
  truncation bound needs ``(1 + e^ε)·β < δ``, so it stays finite up to ε ≈ 15."""
  rate = expected_batch / num_examples
  size = expected_batch
  while steps * clipjax.poisson_overflow_probability(num_examples, rate, size) > DELTA * 1e-7:
    size += 1
  return clipjax.PoissonSampler(num_examples, rate, size)


def _plain_sum(params, x, y, mask):
  """The non-private baseline on the same batches: the gradient of the summed loss."""

  def total(p):
    losses = jax.vmap(example_loss, (None, 0, 0))(p, x, y)
    return jnp.sum(jnp.where(mask, losses, 0.0))

  return jax.grad(total)(params)


def _transformation(rule, sigma, expected_batch, key, learning_rate):
  if rule is None:
    return optax.chain(optax.scale(1 / expected_batch), optax.adam(learning_rate))
  if rule.adaptive:
    noise = clipjax.adaptive_dp_noise(rule.clip_norm, sigma, expected_batch, key)
  else:
    noise = clipjax.dp_noise(rule.clip_norm, sigma, expected_batch, key)
  return optax.chain(noise, optax.adam(learning_rate))


def train(data, sampler, rule, sigma, *, epochs, steps_per_epoch, learning_rate, seed):
  """Trains the digits MLP; ``rule=None`` without privacy. Returns (params, test accuracy
  after every epoch, clip norms after every epoch)."""
  expected_batch = sampler.num_examples * sampler.sample_rate
  tx = _transformation(rule, sigma, expected_batch, jax.random.key(seed + 1), learning_rate)
  params = _digits.init_mlp(jax.random.key(seed))
  opt_state = tx.init(params)

  def clip_norm_of(opt_state):
    return opt_state[0].clip_norm if rule.adaptive else rule.clip_norm

  def step(carry, key):
    params, opt_state = carry
    indices, mask = sampler(key)
    x, y = data.x_train[indices], data.y_train[indices]
    if rule is None:
      summed, extra = _plain_sum(params, x, y, mask), {}
    else:
      grad_fn = clipjax.clipped_grad(example_loss, clip_norm_of(opt_state), scaling=rule.scaling)
      summed, norms = grad_fn(params, x, y, mask=mask)
      extra = {"norms": norms, "mask": mask}
    updates, opt_state = tx.update(summed, opt_state, params, **extra)
    return (optax.apply_updates(params, updates), opt_state), None

  @jax.jit
  def epoch(params, opt_state, key):
    (params, opt_state), _ = jax.lax.scan(
      step, (params, opt_state), jax.random.split(key, steps_per_epoch)
    )
    return params, opt_state

  accuracies, clip_norms = [], []
  name = "non-private" if rule is None else rule.name
  keys = jax.random.split(jax.random.key(seed + 2), epochs)
  for key in tqdm(keys, desc=f"{name} (seed {seed})", unit="epoch", leave=False):
    params, opt_state = epoch(params, opt_state, key)
    accuracies.append(_digits.accuracy(params, data.x_test, data.y_test))
    if rule is not None:
      clip_norms.append(jax.tree.map(float, clip_norm_of(opt_state)))
  return params, accuracies, clip_norms
