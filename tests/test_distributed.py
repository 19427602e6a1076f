"""ShardedPoissonSampler and the key check, in one process (tests/test_multiprocess.py
runs them on two)."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import clipjax
from clipjax.privacy.distributed import _fingerprint

SAMPLER = clipjax.ShardedPoissonSampler(4, 50, sample_rate=0.2, shard_batch_size=16)


def test_batch_is_each_shards_own_poisson_draw():
  key = jax.random.key(3)
  indices, mask = SAMPLER(key)
  assert indices.shape == mask.shape == (64,)
  for s in range(4):  # an independent construction from the public PoissonSampler
    own, own_mask = clipjax.PoissonSampler(50, 0.2, 16)(jax.random.fold_in(key, s))
    np.testing.assert_array_equal(indices[16 * s : 16 * (s + 1)], np.asarray(own) + 50 * s)
    np.testing.assert_array_equal(mask[16 * s : 16 * (s + 1)], own_mask)
  # Different steps draw different batches.
  assert not np.array_equal(indices, SAMPLER(jax.random.key(4))[0])


def test_accounting_is_one_shards():
  assert SAMPLER.accounting == clipjax.PoissonSampler(50, 0.2, 16).accounting
  assert (SAMPLER.num_examples, SAMPLER.max_batch_size) == (200, 64)
  assert SAMPLER.expected_batch_size == pytest.approx(40.0)
  p = clipjax.poisson_overflow_probability(50, 0.2, 16)
  assert SAMPLER.overflow_probability == pytest.approx(1 - (1 - p) ** 4, rel=1e-12)


def test_global_batch_gathers_the_same_examples():
  mesh = jax.make_mesh((jax.device_count(),), ("batch",))
  sharding = NamedSharding(mesh, P("batch"))
  sampler = clipjax.ShardedPoissonSampler(4, 50, 0.2, shard_batch_size=4 * jax.device_count())
  assert sampler.local_shards(sharding) == range(4)  # one process holds every shard
  x = np.random.default_rng(0).normal(size=(200, 3)).astype(np.float32)
  key = jax.random.key(5)
  (batch, labels), mask = sampler.global_batch(key, (x, np.arange(200)), sharding, debug=True)
  indices, expected_mask = sampler(key)
  np.testing.assert_array_equal(batch, x[np.asarray(indices)])
  np.testing.assert_array_equal(labels, indices)
  np.testing.assert_array_equal(mask, expected_mask)
  assert batch.sharding.spec[0] == "batch"
  with pytest.raises(ValueError, match="local_data must hold"):
    sampler.global_batch(key, x[:100], sharding)


@pytest.mark.parametrize("name", ["num_shards", "shard_size", "shard_batch_size"])
def test_bad_sizes_name_the_argument(name):
  args = {"num_shards": 2, "shard_size": 10, "sample_rate": 0.1, "shard_batch_size": 4}
  with pytest.raises(ValueError, match=name):
    clipjax.ShardedPoissonSampler(**{**args, name: 0})
  with pytest.raises(ValueError, match="sample_rate"):
    clipjax.ShardedPoissonSampler(**{**args, "sample_rate": 1.5})
  with pytest.raises(ValueError, match="shard"):
    SAMPLER.shard(jax.random.key(0), 4)


def test_fingerprint_tells_keys_apart():
  same = _fingerprint(jax.random.key(0))
  assert np.array_equal(same, _fingerprint(jax.random.key(0)))
  assert not np.array_equal(same, _fingerprint(jax.random.key(1)))
  assert not np.array_equal(_fingerprint({"a": np.zeros(2)}), _fingerprint({"b": np.zeros(2)}))
  clipjax.assert_same_across_processes(jax.random.key(0))  # one process: nothing to compare
