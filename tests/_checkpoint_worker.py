"""A private training run that checkpoints, for tests/test_checkpoint.py to kill and resume.

``python tests/_checkpoint_worker.py DIRECTORY OUT.npz`` trains a small softmax
regression with adaptive clipping (:func:`clipjax.adaptive_dp_noise`) and Adam for
``STEPS`` steps on Poisson batches, saving every ``SAVE_EVERY`` steps and resuming from
the latest checkpoint in DIRECTORY. It prints ``resumed K``, ``step T``,
``saving T`` (just before a save) and ``saved T``, and at the end writes the
parameters, the clip norm and the ε of the steps taken to OUT.npz.

With ``WAIT=1`` in the environment, the process first imports and compiles
everything, prints ``ready`` and waits for a line on its standard input before it
restores (so that a test can start it early). With ``SLOW_SAVE=T``, the save of step T
waits two seconds before orbax renames its finished temporary directory into place, so
that a test can kill the process during that save without racing it; with
``PAUSE_AFTER=T``, the process stops for a minute after step T, for the same reason.
"""

import os
import sys
import time

STEPS, SAVE_EVERY = 12, 3
CLIP_NORM, NOISE_MULTIPLIER, SAMPLE_RATE, NUM_EXAMPLES, MAX_BATCH = 1.0, 1.2, 0.125, 128, 48


def build(clip_norm=CLIP_NORM, noise_multiplier=NOISE_MULTIPLIER, sample_rate=SAMPLE_RATE):
  """(config, fresh state, data, optimizer) of the run; the fresh state is step 0's."""
  import jax  # noqa: PLC0415 - the test imports this module without running it
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  import optax  # noqa: PLC0415

  import clipjax  # noqa: PLC0415

  sampler = clipjax.PoissonSampler(NUM_EXAMPLES, sample_rate, MAX_BATCH)
  config = clipjax.PrivacyConfig(
    clip_norm, noise_multiplier, sampler, delta=1e-5, extra={"learning_rate": 0.05}
  )
  rng = np.random.default_rng(0)
  data = (
    jnp.asarray(rng.normal(size=(NUM_EXAMPLES, 6)), jnp.float32),
    jnp.asarray(rng.integers(0, 3, NUM_EXAMPLES), jnp.int32),
  )
  expected = sample_rate * NUM_EXAMPLES
  tx = optax.chain(
    clipjax.adaptive_dp_noise(clip_norm, noise_multiplier, expected, key=jax.random.key(1)),
    optax.adam(0.05),
  )
  params = {"w": jnp.zeros((6, 3), jnp.float32), "b": jnp.zeros(3, jnp.float32)}
  fresh = clipjax.PrivateTrainingState(params, tx.init(params), jax.random.key(2), 0)
  return config, fresh, data, tx


def _slow_rename(step):
  rename = os.rename

  def slow(src, dst, *args, **kwargs):
    if os.path.basename(os.fspath(src)).startswith(f"{step}.orbax-checkpoint-tmp"):
      time.sleep(2)
    return rename(src, dst, *args, **kwargs)

  os.rename = slow


def main(directory, out):
  if os.environ.get("SLOW_SAVE"):
    _slow_rename(int(os.environ["SLOW_SAVE"]))
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  import optax  # noqa: PLC0415

  import clipjax  # noqa: PLC0415

  config, fresh, (x, y), tx = build()

  def example_loss(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(x @ params["w"] + params["b"], y)

  @jax.jit
  def step(params, opt_state, data_key, steps):
    indices, mask = config.sampler(jax.random.fold_in(data_key, steps))  # state.batch_key()
    grad_fn = clipjax.clipped_grad(example_loss, opt_state[0].clip_norm)
    summed, norms = grad_fn(params, x[indices], y[indices], mask=mask)
    updates, opt_state = tx.update(summed, opt_state, params, norms=norms, mask=mask)
    return optax.apply_updates(params, updates), opt_state

  if os.environ.get("WAIT"):
    import orbax.checkpoint  # noqa: F401, PLC0415 - imported before the wait, not after

    jax.block_until_ready(step(fresh.params, fresh.opt_state, fresh.data_key, 0))  # compiles
    print("ready", flush=True)
    sys.stdin.readline()
  state = clipjax.restore_checkpoint(directory, fresh, config, missing_ok=True)
  print("resumed", state.steps, flush=True)
  while state.steps < STEPS:
    params, opt_state = step(state.params, state.opt_state, state.data_key, state.steps)
    state = state._replace(params=params, opt_state=opt_state, steps=state.steps + 1)
    print("step", state.steps, flush=True)
    if os.environ.get("PAUSE_AFTER") == str(state.steps):
      time.sleep(60)  # a test kills it here: between two saves, and not after
    if state.steps % SAVE_EVERY == 0:
      print("saving", state.steps, flush=True)
      clipjax.save_checkpoint(directory, state, config)
      print("saved", state.steps, flush=True)
  np.savez(
    out,
    w=np.asarray(state.params["w"]),
    b=np.asarray(state.params["b"]),
    clip_norm=np.asarray(state.opt_state[0].clip_norm),
    steps=state.steps,
    epsilon=config.epsilon(state.steps, accountant="rdp"),
  )


if __name__ == "__main__":
  main(*sys.argv[1:3])
