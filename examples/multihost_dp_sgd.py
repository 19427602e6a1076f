"""DP-SGD on digits with several processes: each loads only its own shards, one noise draw.

The model, loss, schedule and accounting are those of ``examples/dp_sgd.py`` (the MLP
on scikit-learn's digits, Poisson batches of expected size 64, clip norm 1, Adam, PLD
calibration for a target ε, δ = 1e-5), run the way a multi-host job runs it:

- ``jax.distributed`` joins the processes; the batch is sharded over every device of
  every process, the parameters and optimizer state are replicated, and ``jit``
  partitions each step: every device clips its own examples and the clipped sum is
  one all-reduce (the script checks that the compiled step gathers nothing).
- The training set is cut into ``--shards`` equal shards (default 4), and each process
  keeps only the rows of the shards whose batch slots live on its devices.
  :class:`clipjax.ShardedPoissonSampler` draws each shard's part of step ``t``'s batch
  from ``fold_in(fold_in(data_key, t), shard)``: the same key on every process, so the
  batch is a function of the seeds and the shards, not of the number of processes.
  The ε is that of one shard's truncated Poisson sampler (``sampler.accounting``).
- :func:`clipjax.dp_noise` draws the noise once per step, inside the jitted step, from
  the key in the replicated optimizer state. With ``--debug`` every step checks that
  all processes hold the same sampling key, and every epoch that they hold the same
  optimizer state (:func:`clipjax.assert_same_across_processes`).
- With ``--checkpoint-dir``, the run saves its whole state every ``--save-every``
  steps (:func:`clipjax.save_checkpoint`, all processes together) and resumes from the
  latest checkpoint (:func:`clipjax.restore_checkpoint`), refusing one written with
  another configuration; the ε reported is recomputed from the restored step count.

On one machine, the script launches the processes itself (``--processes`` of
``--devices-per-process`` CPU devices each, gloo collectives, a free port on
127.0.0.1); process 0 prints. The same configuration gives the same ε and the same
accuracy whatever the split (the parameters agree to float32 rounding)::

    python examples/multihost_dp_sgd.py                      # 2 processes x 2 devices
    python examples/multihost_dp_sgd.py --processes 4 --devices-per-process 1
    python examples/multihost_dp_sgd.py --processes 1 --devices-per-process 4

On a cluster, run the same script once per host with ``--worker``, which calls
``jax.distributed.initialize`` before anything else touches JAX. On Cloud TPU, SLURM,
Open MPI and Kubernetes it finds the coordinator, the process count and its rank by
itself; elsewhere pass them::

    python examples/multihost_dp_sgd.py --worker \\
        --coordinator HOST0:12345 --num-processes 8 --process-id $RANK

The number of shards must be a multiple of the number of processes, and a host's
shards whole multiples of its devices' slots. Here every process reads the bundled
digits and keeps only its shards' rows; a real job loads only those rows from its
storage (shard ``s`` is rows ``s·shard_size`` to ``(s+1)·shard_size - 1`` of one
fixed order of the dataset, the same for every host).

    python examples/multihost_dp_sgd.py [--target-epsilon 4] [--epochs 40] [--smoke]
"""

import math
import os
import socket
import subprocess
import sys
import time

import _private_training as pt  # examples/ is on sys.path when run as a script

DELTA = pt.DELTA
CLIP_NORM = 1.0


def _parse(argv):
  parser = pt.arguments(__doc__)
  parser.add_argument("--target-epsilon", type=float, default=4.0)
  parser.add_argument("--noise-multiplier", type=float, help="σ (default: calibrated)")
  parser.add_argument("--shards", type=int, default=4, help="equal shards of the data")
  parser.add_argument("--processes", type=int, default=2, help="local processes to launch")
  parser.add_argument("--devices-per-process", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--debug", action="store_true", help="check keys across processes")
  parser.add_argument("--checkpoint-dir", help="save here, and resume from here")
  parser.add_argument("--save-every", type=int, default=100, help="steps between saves")
  parser.add_argument("--worker", action="store_true", help="be one process of the job")
  parser.add_argument("--coordinator", help="HOST:PORT of process 0 (with --worker)")
  parser.add_argument("--num-processes", type=int)
  parser.add_argument("--process-id", type=int)
  args = parser.parse_args(argv)
  if args.smoke:
    args.epochs = 2
  return args


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def setup(args, num_train):
  """(sampler, steps, steps per epoch, σ): the same on every process, from the arguments."""
  import clipjax  # noqa: PLC0415 - the launcher imports it only here

  shard_size = num_train // args.shards
  steps_per_epoch = round(args.shards * shard_size / args.batch_size)
  steps = args.epochs * steps_per_epoch
  # Each shard's slots are padded as dp_sgd.py pads the whole batch: the run overflows
  # a shard with probability below δ·1e-7.
  rate = args.batch_size / (args.shards * shard_size)
  slots = math.ceil(rate * shard_size)
  while steps * clipjax.poisson_overflow_probability(shard_size, rate, slots) > DELTA * 1e-7:
    slots += 1
  sampler = clipjax.ShardedPoissonSampler(args.shards, shard_size, rate, slots)
  sigma = args.noise_multiplier
  if sigma is None:
    sigma = clipjax.calibrate_noise(
      args.target_epsilon, DELTA, steps=steps, accountant="pld", **sampler.accounting
    )
  return sampler, steps, steps_per_epoch, sigma


def launch(args, argv):
  """Starts ``--processes`` workers on 127.0.0.1; returns when all have finished."""
  if args.noise_multiplier is None:  # calibrated once here, not once per process
    from sklearn.datasets import load_digits  # noqa: PLC0415
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    labels = load_digits().target  # the split of _digits.load, without starting JAX
    train, _ = train_test_split(labels, test_size=0.25, random_state=args.seed, stratify=labels)
    sigma = setup(args, len(train))[3]
    argv = [*argv, "--noise-multiplier", repr(sigma)]
  port = _free_port()
  procs = []
  for process_id in range(args.processes):
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices_per_process}"
    env["JAX_PLATFORMS"] = "cpu"
    worker = ["--worker", "--num-processes", str(args.processes), "--process-id", str(process_id)]
    worker += ["--coordinator", f"127.0.0.1:{port}"]
    procs.append(
      subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *argv, *worker],
        env=env,
        stdout=None if process_id == 0 else subprocess.DEVNULL,
      )
    )
  codes = [proc.wait() for proc in procs]
  if any(codes):
    raise SystemExit(f"worker exit codes: {codes}")


def worker(args):
  """One process of the job: trains, and process 0 reports."""
  import jax  # noqa: PLC0415 - after the launcher has set the device count

  if args.num_processes is None or args.num_processes > 1:
    # Collectives between CPU devices of different processes; no effect on GPUs or TPUs.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  import _digits  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  import optax  # noqa: PLC0415
  from jax.sharding import NamedSharding  # noqa: PLC0415
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415

  import clipjax  # noqa: PLC0415

  lead = jax.process_index() == 0
  say = print if lead else (lambda *a, **k: None)
  start = time.perf_counter()

  data = _digits.load(seed=args.seed)
  sampler, steps, steps_per_epoch, sigma = setup(args, int(data.x_train.shape[0]))
  shard_size = sampler.shard_size
  config = clipjax.PrivacyConfig(
    CLIP_NORM, sigma, sampler, DELTA, extra={"learning_rate": args.learning_rate}
  )

  mesh = jax.make_mesh((jax.device_count(),), ("batch",))
  batch_sharding, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
  shards = sampler.local_shards(batch_sharding)
  rows = slice(shards.start * shard_size, shards.stop * shard_size)
  # A real job would load only these rows.
  local = (np.asarray(data.x_train)[rows], np.asarray(data.y_train)[rows])
  say(
    f"{jax.process_count()} process(es) x {jax.local_device_count()} device(s); "
    f"{sampler.num_examples} training images in {args.shards} shards of {shard_size}, "
    f"process 0 holds shards {list(shards)}; Poisson q = {sampler.sample_rate:.4f} "
    f"(expected batch {sampler.expected_batch_size:g}), {sampler.shard_batch_size} slots "
    f"per shard; {steps} steps; σ = {sigma:.4f}, C = {CLIP_NORM}, δ = {DELTA:g}"
  )

  init = _digits.init_mlp(jax.random.key(args.seed))  # the same values on every process
  params = jax.tree.map(
    lambda a: jax.make_array_from_callback(a.shape, replicated, lambda i: np.asarray(a)[i]), init
  )
  noise = clipjax.dp_noise(CLIP_NORM, sigma, sampler.expected_batch_size, jax.random.key(1))
  tx = optax.chain(noise, optax.adam(args.learning_rate))
  opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
  state = clipjax.PrivateTrainingState(params, opt_state, jax.random.key(args.seed + 2), 0)
  if args.checkpoint_dir:
    state = clipjax.restore_checkpoint(args.checkpoint_dir, state, config, missing_ok=True)
    if state.steps:
      say(f"resuming at step {state.steps} from {args.checkpoint_dir}")

  grad_fn = clipjax.clipped_grad(pt.example_loss, CLIP_NORM)

  def step(params, opt_state, x, y, mask):
    summed, _ = grad_fn(params, x, y, mask=mask)
    updates, opt_state = tx.update(summed, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  (x, y), mask = sampler.global_batch(state.batch_key(), local, batch_sharding)
  step = jax.jit(step, out_shardings=replicated).lower(state.params, state.opt_state, x, y, mask)
  step = step.compile()
  hlo = step.as_text()
  gathers = [c for c in ("all-gather", "all-to-all") if f" {c}(" in hlo or f" {c}-start(" in hlo]
  say(f"collectives in the step: all-reduce {' all-reduce(' in hlo}; gathers {gathers or 'none'}")

  accuracy = []
  while state.steps < steps:
    (x, y), mask = sampler.global_batch(state.batch_key(), local, batch_sharding, debug=args.debug)
    params, opt_state = step(state.params, state.opt_state, x, y, mask)
    state = state._replace(params=params, opt_state=opt_state, steps=state.steps + 1)
    if args.checkpoint_dir and state.steps % args.save_every == 0:
      clipjax.save_checkpoint(args.checkpoint_dir, state, config)
    if state.steps % steps_per_epoch == 0:
      if args.debug:
        clipjax.assert_same_across_processes(state.opt_state, "optimizer state")
      # Replicated: every process reads its own copy.
      local_params = jax.tree.map(np.asarray, state.params)
      accuracy.append(_digits.accuracy(local_params, data.x_test, data.y_test))
      epoch = state.steps // steps_per_epoch
      if epoch % 10 == 0 or state.steps == steps:
        say(f"epoch {epoch:3d}  test accuracy {accuracy[-1]:.3f}", flush=True)
  eps = {name: config.epsilon(state.steps, accountant=name) for name in ("rdp", "pld")}
  final = jax.tree.map(np.asarray, state.params)
  say(
    f"after {state.steps} steps: ε = {eps['pld']:.4f} (PLD), {eps['rdp']:.4f} (RDP), "
    f"δ = {DELTA:g}; test accuracy {_digits.accuracy(final, data.x_test, data.y_test):.4f}; "
    f"{time.perf_counter() - start:.0f} s"
  )
  if lead:
    os.makedirs(args.out, exist_ok=True)
    name = f"multihost_dp_sgd_{jax.process_count()}x{jax.local_device_count()}.npz"
    np.savez(os.path.join(args.out, name), *jax.tree.leaves(final))
    say(f"final parameters: {os.path.join(args.out, name)}")
  if jax.process_count() > 1:
    jax.distributed.shutdown()
  return {"epsilon": eps, "accuracy": accuracy, "steps": state.steps}


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  args = _parse(argv)
  if args.worker:
    return worker(args)
  return launch(args, argv)


if __name__ == "__main__":
  main()
