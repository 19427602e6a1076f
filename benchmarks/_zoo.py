"""The models of the ghost benchmark: what DP-SGD is used for, as a new user writes them.

Each entry builds ``(loss_fn, params, batch)``: ``loss_fn(params, *example)`` is the
scalar loss of ONE example (what ``clipjax.clipped_grad`` takes), ``params`` a pytree of
float32 arrays and ``batch`` a tuple of arrays with a leading batch axis. Parameters and
data come from NumPy, so building a model compiles nothing.

* ``mlp_64_256_256_10``, ``mlp_3072_512_512_10``: ReLU MLPs, batch 256.
* ``cnn``: 4 x (Conv 3x3 -> GroupNorm(8) -> relu), channels 32/64/128/256, strides
  1/2/2/2, mean-pool, Dense(10); 32x32x3 inputs, batch 64 (392k parameters).
* ``cnn_small``: the same with channels 16/32/64 (strides 1/2/2), batch 32.
* ``transformer``: a causal language model, vocabulary 32000, width 128, 2 pre-LayerNorm
  blocks (4-head causal attention, MLP 512), learned positions, output projection tied
  to the token embedding (``nn.Embed.attend``); sequences of 64 tokens, batch 32
  (4.5M parameters).
* ``mobilenet``: depthwise-separable convolutions: Conv 3x3 (32) -> GroupNorm -> relu,
  then 3 x (depthwise 3x3, stride 2 -> GroupNorm -> relu -> pointwise 1x1, doubling
  the channels -> GroupNorm -> relu), mean-pool, Dense(10); 32x32x3 inputs, batch 64.

The layers issue 23 asks about, also in the zoo:

* ``vit_small``: the ViT on 32x32x3 images, patch 4, width 128, 4 heads, MLP 512, 4
  blocks, 10 classes, batch 32.
* ``lstm_optimized``, ``lstm_cell``: an LSTM (``nn.OptimizedLSTMCell``, one fused gate
  product; ``nn.LSTMCell``, one product per gate) of 128 units run by ``nn.RNN`` over 32
  steps of 32 features, Dense(10) on the last state; batch 32.
* ``conv_transpose_decoder``: an 8x8x64 latent up to a 64x64x3 image by three
  ``nn.ConvTranspose`` 4x4, strides (2, 2) (64 -> 32 -> 16 -> 3 channels, relu between),
  squared-error loss against a random image; batch 32.

``LARGE`` (``python -m benchmarks --only ghost --large``): ``gpt2_small``, a
GPT-2-small-shaped LM (width 768, 12 heads, MLP 3072, 12 blocks stacked by scan,
vocabulary 50257 tied, T 256, batch 4, 124M parameters), and ``vit_b16``, a
ViT-B/16-shaped classifier (224x224x3, patch 16, width 768, 12 blocks by scan, 1000
classes, batch 4, 86M parameters). ``EXTRA``: smaller shapes of these for measuring
(``--models`` picks them).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


def _fill(shapes, rng):
  """Random parameters for a pytree of shapes (scaled like a fan-in initialisation)."""

  def one(s):
    fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 1
    scale = fan_in**-0.5 if len(s.shape) > 1 else 0.1
    return jnp.asarray(scale * rng.standard_normal(s.shape) + (len(s.shape) == 1), s.dtype)

  return jax.tree.map(one, shapes)


def _cross_entropy(logits, label):
  return -jax.nn.log_softmax(logits)[label]


# ----------------------------------------------------------------------------- MLPs


def _mlp_loss(params, x, y):
  """Softmax cross-entropy of one example under a ReLU MLP."""
  h = x
  for w, b in params[:-1]:
    h = jax.nn.relu(h @ w + b)
  w, b = params[-1]
  return _cross_entropy(h @ w + b, y)


def _mlp(sizes, batch, rng):
  params = [
    (
      jnp.asarray(rng.standard_normal((m, n)) / np.sqrt(m), jnp.float32),
      jnp.zeros((n,), jnp.float32),
    )
    for m, n in zip(sizes[:-1], sizes[1:])
  ]
  x = jnp.asarray(rng.standard_normal((batch, sizes[0])), jnp.float32)
  y = jnp.asarray(rng.integers(0, sizes[-1], batch), jnp.int32)
  return _mlp_loss, params, (x, y)


# ----------------------------------------------------------------------------- CNNs


class CNN(nn.Module):
  """(Conv 3x3 -> GroupNorm(8) -> relu) per channel count, mean-pool, Dense(10)."""

  channels: tuple = (32, 64, 128, 256)
  strides: tuple = (1, 2, 2, 2)

  @nn.compact
  def __call__(self, x):
    for c, s in zip(self.channels, self.strides):
      x = nn.relu(nn.GroupNorm(8)(nn.Conv(c, (3, 3), strides=s)(x)))
    return nn.Dense(10)(jnp.mean(x, axis=(0, 1)))


class MobileNet(nn.Module):
  """A stem convolution, then depthwise-separable blocks that halve the resolution."""

  channels: tuple = (32, 64, 128, 256)

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.GroupNorm(8)(nn.Conv(self.channels[0], (3, 3))(x)))
    for c_in, c_out in zip(self.channels[:-1], self.channels[1:]):
      x = nn.Conv(c_in, (3, 3), strides=2, feature_group_count=c_in)(x)
      x = nn.relu(nn.GroupNorm(8)(x))
      x = nn.relu(nn.GroupNorm(8)(nn.Conv(c_out, (1, 1))(x)))
    return nn.Dense(10)(jnp.mean(x, axis=(0, 1)))


def _image_model(model, batch, rng):
  x = jnp.asarray(rng.standard_normal((batch, 32, 32, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
  params = _fill(jax.eval_shape(model.init, jax.random.key(0), x[0]), rng)

  def loss(params, x, y):
    return _cross_entropy(model.apply(params, x), y)

  return loss, params, (x, y)


# ---------------------------------------------------------------------- transformer


class Block(nn.Module):
  """Pre-LayerNorm transformer block: (causal) self-attention, then an MLP."""

  heads: int = 4
  hidden: int = 512
  causal: bool = True

  @nn.compact
  def __call__(self, x):
    mask = nn.make_causal_mask(jnp.ones(x.shape[0])) if self.causal else None
    x = x + nn.MultiHeadDotProductAttention(self.heads)(nn.LayerNorm()(x), mask=mask)
    h = nn.Dense(self.hidden)(nn.LayerNorm()(x))
    return x + nn.Dense(x.shape[-1])(nn.gelu(h))


class _ScannedBlock(nn.Module):
  """A block in the form ``nn.scan`` stacks: ``(carry, None) -> (carry, None)``."""

  heads: int
  hidden: int
  causal: bool = True

  @nn.compact
  def __call__(self, x, _):
    return Block(self.heads, self.hidden, self.causal)(x), None


def _stacked(blocks, heads, hidden, causal=True):
  """``blocks`` blocks with parameters stacked on a leading axis, run by one scan."""
  stack = nn.scan(
    _ScannedBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=blocks
  )
  return stack(heads, hidden, causal)


class TransformerLM(nn.Module):
  """Token and learned position embeddings, blocks, LayerNorm, logits by the tied table.

  With ``scan``, the blocks' parameters are stacked on a leading axis and the blocks
  run as one ``lax.scan`` (``nn.scan``), as large language models are usually written.
  """

  vocab: int = 32000
  width: int = 128
  blocks: int = 2
  length: int = 64
  heads: int = 4
  hidden: int = 512
  scan: bool = False

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(self.vocab, self.width)
    positions = self.param(
      "positions", nn.initializers.normal(0.02), (self.length, self.width), jnp.float32
    )
    x = embed(tokens) + positions[: tokens.shape[0]]
    if self.scan:
      x, _ = _stacked(self.blocks, self.heads, self.hidden)(x, None)
    else:
      for _ in range(self.blocks):
        x = Block(self.heads, self.hidden)(x)
    return embed.attend(nn.LayerNorm()(x))


def _transformer(batch, rng, vocab=32000, length=64, **shape):
  """The tied-embedding LM (``shape``: ``TransformerLM``'s other fields) on random tokens."""
  model = TransformerLM(vocab=vocab, length=length, **shape)
  width = model.width
  tokens = jnp.asarray(rng.integers(0, vocab, (batch, length + 1)), jnp.int32)
  params = _fill(jax.eval_shape(model.init, jax.random.key(0), tokens[0, :-1]), rng)
  params = jax.tree.map(lambda a: a * 0.1 if a.shape == (vocab, width) else a, params)

  def loss(params, tokens):
    logits = model.apply(params, tokens[:-1])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[1:]))

  return loss, params, (tokens,)


class ViT(nn.Module):
  """Vision transformer: patches by a strided convolution, a class token, learned
  positions, blocks stacked by scan, LayerNorm, a linear head on the class token."""

  patch: int = 16
  width: int = 768
  blocks: int = 12
  heads: int = 12
  hidden: int = 3072
  classes: int = 1000

  @nn.compact
  def __call__(self, image):
    x = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch, padding="VALID")(image)
    x = x.reshape(-1, self.width)
    cls = self.param("cls", nn.initializers.normal(0.02), (1, self.width), jnp.float32)
    x = jnp.concatenate([cls, x], axis=0)
    x = x + self.param("positions", nn.initializers.normal(0.02), x.shape, jnp.float32)
    x, _ = _stacked(self.blocks, self.heads, self.hidden, causal=False)(x, None)
    return nn.Dense(self.classes)(nn.LayerNorm()(x[0]))


def _vit(batch, rng, size=224, **shape):
  model = ViT(**shape)
  x = jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, model.classes, batch), jnp.int32)
  params = _fill(jax.eval_shape(model.init, jax.random.key(0), x[0]), rng)

  def loss(params, x, y):
    return _cross_entropy(model.apply(params, x), y)

  return loss, params, (x, y)


# ---------------------------------------------------------------- LSTM, decoder


class LSTMClassifier(nn.Module):
  """An LSTM over the sequence (``nn.RNN``, a scan over time), Dense(10) on the last state."""

  hidden: int = 128
  optimized: bool = True

  @nn.compact
  def __call__(self, x):
    cell = nn.OptimizedLSTMCell if self.optimized else nn.LSTMCell
    h = nn.RNN(cell(self.hidden))(x)
    return nn.Dense(10)(h[-1])


def _lstm(batch, rng, optimized, length=32, features=32):
  model = LSTMClassifier(optimized=optimized)
  x = jnp.asarray(rng.standard_normal((batch, length, features)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
  params = _fill(jax.eval_shape(model.init, jax.random.key(0), x[0]), rng)

  def loss(params, x, y):
    return _cross_entropy(model.apply(params, x), y)

  return loss, params, (x, y)


class Decoder(nn.Module):
  """Transposed convolutions 4x4, stride 2, each doubling the resolution (relu between)."""

  channels: tuple = (32, 16, 3)

  @nn.compact
  def __call__(self, z):
    for k, c in enumerate(self.channels):
      z = nn.ConvTranspose(c, (4, 4), strides=(2, 2))(z)
      z = nn.relu(z) if k < len(self.channels) - 1 else z
    return z


def _decoder(batch, rng, latent=(8, 8, 64)):
  model = Decoder()
  z = jnp.asarray(rng.standard_normal((batch, *latent)), jnp.float32)
  params = _fill(jax.eval_shape(model.init, jax.random.key(0), z[0]), rng)
  size = latent[0] * 2 ** len(model.channels)
  image = jnp.asarray(rng.uniform(size=(batch, size, size, model.channels[-1])), jnp.float32)

  def loss(params, z, image):
    return jnp.mean((model.apply(params, z) - image) ** 2)

  return loss, params, (z, image)


# ------------------------------------------------------------------------------ zoo

MODELS = {
  "mlp_64_256_256_10": lambda rng: _mlp((64, 256, 256, 10), 256, rng),
  "mlp_3072_512_512_10": lambda rng: _mlp((3072, 512, 512, 10), 256, rng),
  "cnn": lambda rng: _image_model(CNN(), 64, rng),
  "cnn_small": lambda rng: _image_model(CNN((16, 32, 64), (1, 2, 2)), 32, rng),
  "transformer": lambda rng: _transformer(32, rng),
  "mobilenet": lambda rng: _image_model(MobileNet(), 64, rng),
  # The layers of issue 23's table: a small ViT, fused and plain LSTM cells, a decoder
  # of transposed convolutions.
  "vit_small": lambda rng: _vit(
    32, rng, size=32, patch=4, width=128, blocks=4, heads=4, hidden=512, classes=10
  ),
  "lstm_optimized": lambda rng: _lstm(32, rng, optimized=True),
  "lstm_cell": lambda rng: _lstm(32, rng, optimized=False),
  "conv_transpose_decoder": lambda rng: _decoder(32, rng),
}


# GPT-2-shaped language models (width 768, 12 heads, MLP 3072, the 50257-token
# vocabulary tied to the output projection): two blocks on short sequences (the shape
# whose compile time issue 23 measured), and GPT-2 small (12 blocks stacked by scan).
_GPT2 = dict(vocab=50257, width=768, heads=12, hidden=3072)

LARGE = {
  "gpt2_small": lambda rng: _transformer(4, rng, length=256, blocks=12, scan=True, **_GPT2),
  "vit_b16": lambda rng: _vit(4, rng),
}
# Shapes for compile-time measurements and smaller runs of the large ones.
EXTRA = {
  "gpt2_2block": lambda rng: _transformer(2, rng, length=16, blocks=2, **_GPT2),
  "gpt2_small_t64_b2": lambda rng: _transformer(2, rng, length=64, blocks=12, scan=True, **_GPT2),
  "vit_b16_6block_b2": lambda rng: _vit(2, rng, blocks=6),
}


def build(name: str, seed: int = 0):
  """``(loss_fn, params, batch)`` of the named zoo (or large) model."""
  return {**MODELS, **LARGE, **EXTRA}[name](np.random.default_rng(seed))
