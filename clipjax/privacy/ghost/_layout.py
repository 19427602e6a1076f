"""Which leaf elements a use touches, described by strides: O(rank), never O(size).

Two uses of one leaf can pair their factors (``_leaves``) when their ``(H, L, R)``
arrangements of the leaf hold the same elements in the same places, or in transposed
places, or touch disjoint elements. Those arrangements are the leaf's index array put
through the use's structural chain (reshape, transpose, squeeze, slice, broadcast,
casts), the slicing of enclosing scans and the rule's ``arrange``. Every one of these
keeps the index array *affine*: element ``o`` holds ``offset + Σ_k o_k s_k``, with each
axis possibly a product of sub-axes of their own strides (a transposed kernel reshaped
into one axis). :class:`Strided` carries that description through the same NumPy-style
calls an index array would take, so deciding "same", "swapped" or "disjoint" costs the
rank of the arrays, not their size (an index array as large as a 50257 x 768 embedding,
per use, took minutes to trace).

Whatever it cannot describe exactly (a reshape that would cut a sub-axis unevenly, a
partial slice of a merged axis, an operation other than these) raises :class:`Unknown`,
and the caller takes the conservative answer: the use gets no pairing (it goes explicit),
which is exact, only slower.
"""

from __future__ import annotations

import math
from typing import NamedTuple


class Unknown(Exception):  # noqa: N818 (a verdict, not an error)
  """The layout is not described by strides (the caller falls back)."""


def _row_major(shape) -> list[int]:
  strides, step = [], 1
  for n in reversed(shape):
    strides.append(step)
    step *= n
  return strides[::-1]


def _sub(n: int, stride: int) -> tuple:
  """One axis of size ``n`` moving by ``stride``, as a tuple of sub-axes (none if n is 1)."""
  if n < 1:
    raise Unknown("empty axis")
  return ((n, stride),) if n > 1 else ()


def _merged(axis) -> tuple:
  """The sub-axes with every pair that runs on (outer stride = inner size x stride)
  merged into one: the same elements, and a partial slice of the axis stays describable."""
  merged = []
  for size, stride in axis:
    if merged and merged[-1][1] == size * stride:
      merged[-1] = (merged[-1][0] * size, stride)
    else:
      merged.append((size, stride))
  return tuple(merged)


class Strided:
  """An integer array ``A[o] = offset + Σ_axes Σ_sub digit · stride``, by its strides.

  Each axis is a tuple of ``(size, stride)`` sub-axes, outermost first, every size
  above 1 (an axis of size 1 has none). It answers ``shape``, ``ndim``, ``size``,
  ``reshape``, ``transpose``, ``swapaxes`` and basic indexing like a NumPy array, so a
  rule's ``arrange`` runs on it unchanged.
  """

  def __init__(self, offset: int, axes: tuple):
    self.offset = offset
    self.axes = tuple(_merged(a) for a in axes)

  @classmethod
  def of(cls, shape) -> Strided:
    """``np.arange(prod(shape)).reshape(shape)``."""
    return cls(0, tuple(_sub(n, s) for n, s in zip(shape, _row_major(shape))))

  @property
  def shape(self) -> tuple:
    return tuple(math.prod(n for n, _ in a) for a in self.axes)

  @property
  def ndim(self) -> int:
    return len(self.axes)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  def transpose(self, *perm) -> Strided:
    if len(perm) == 1 and not isinstance(perm[0], int):
      perm = tuple(perm[0])
    if not perm:
      perm = tuple(reversed(range(self.ndim)))
    if sorted(perm) != list(range(self.ndim)):
      raise Unknown(f"transpose {perm} of rank {self.ndim}")
    return Strided(self.offset, tuple(self.axes[p] for p in perm))

  def swapaxes(self, a: int, b: int) -> Strided:
    perm = list(range(self.ndim))
    perm[a], perm[b] = perm[b], perm[a]
    return self.transpose(perm)

  def reshape(self, *shape) -> Strided:
    if len(shape) == 1 and not isinstance(shape[0], int):
      shape = tuple(shape[0])
    shape = [int(n) for n in shape]
    if shape.count(-1) == 1:
      known = math.prod(n for n in shape if n != -1)
      if known == 0 or self.size % known:
        raise Unknown(f"reshape {self.shape} to {shape}")
      shape[shape.index(-1)] = self.size // known
    if math.prod(shape) != self.size or self.size == 0:
      raise Unknown(f"reshape {self.shape} to {shape}")
    queue = [s for a in self.axes for s in a]
    axes = []
    for n in shape:
      need, parts = n, []
      while need > 1:
        size, stride = queue[0]
        if need % size == 0:
          parts.append(queue.pop(0))
          need //= size
        elif size % need == 0:
          # The sub-axis splits: its outer part belongs to this axis.
          parts.append((need, stride * (size // need)))
          queue[0] = (size // need, stride)
          need = 1
        else:
          raise Unknown(f"reshape {self.shape} to {shape}")
      axes.append(tuple(parts))
    return Strided(self.offset, tuple(axes))

  def __getitem__(self, key) -> Strided:
    key = key if isinstance(key, tuple) else (key,)
    if len(key) > self.ndim:
      raise Unknown("too many indices")
    offset, axes = self.offset, []
    for k, axis, n in zip(key, self.axes, self.shape):
      if isinstance(k, slice):
        start, stop, step = k.indices(n)
        length = len(range(start, stop, step))
        if (start, step, length) == (0, 1, n):
          axes.append(axis)
          continue
        if len(axis) != 1 or length < 1:
          raise Unknown("partial slice of a merged axis")
        offset += start * axis[0][1]
        axes.append(_sub(length, axis[0][1] * step))
      else:  # an integer: its mixed-radix digits select one element of every sub-axis
        i = int(k) % n
        for size, stride in reversed(axis):
          offset += (i % size) * stride
          i //= size
    return Strided(offset, tuple(axes) + self.axes[len(key) :])

  def broadcast_in_dim(self, shape, dimensions) -> Strided:
    """``lax.broadcast_in_dim``: new and expanded unit axes repeat (stride 0)."""
    axes = []
    for j, n in enumerate(shape):
      if j in dimensions:
        i = list(dimensions).index(j)
        if self.shape[i] == n:
          axes.append(self.axes[i])
          continue
        if self.shape[i] != 1:
          raise Unknown("broadcast of a non-unit axis")
      axes.append(_sub(n, 0))
    return Strided(self.offset, tuple(axes))

  def canonical(self) -> tuple:
    """A description equal for two arrays only if they are equal (sub-axes are kept
    merged, so equal arrays of one shape have equal descriptions)."""
    return self.shape, self.offset, self.axes

  def interval(self) -> tuple[int, int]:
    """The smallest and largest element."""
    low = high = self.offset
    for axis in self.axes:
      for size, stride in axis:
        low += min(0, (size - 1) * stride)
        high += max(0, (size - 1) * stride)
    return low, high

  def box(self, leaf_shape) -> list[tuple[int, int]] | None:
    """Per leaf axis, an interval holding every element's coordinate on it; None where
    moving along some sub-axis could carry from one leaf axis into the next."""
    if self.offset < 0 or any(s < 0 for a in self.axes for _, s in a):
      return None
    strides = _row_major(leaf_shape)
    coords, rest = [], self.offset
    for s in strides:
      coords.append(rest // s)
      rest %= s
    extent = [0] * len(leaf_shape)
    for axis in self.axes:
      for size, stride in axis:
        if stride == 0:
          continue
        # The outermost leaf axis the step is a whole number of moves along.
        j = next((j for j, s in enumerate(strides) if leaf_shape[j] > 1 and stride % s == 0), None)
        if j is None:
          return None
        extent[j] += (size - 1) * (stride // strides[j])
    box = [(c, c + e) for c, e in zip(coords, extent)]
    if any(high >= n for (_, high), n in zip(box, leaf_shape)):
      return None
    return box


def relation(a: Strided, b: Strided, leaf_shape) -> str | None:
  """How two ``(H, L, R)`` index arrays of one leaf relate: ``"same"``, ``"swapped"``
  (``b`` is ``a`` with ``L`` and ``R`` exchanged), ``"disjoint"`` or None (unknown or
  overlapping: no pairing). Sound, not complete: None is always a safe answer."""
  if a.canonical() == b.canonical():
    return "same"
  if a.canonical() == b.transpose(0, 2, 1).canonical():
    return "swapped"
  (low_a, high_a), (low_b, high_b) = a.interval(), b.interval()
  if high_a < low_b or high_b < low_a:
    return "disjoint"
  box_a, box_b = a.box(leaf_shape), b.box(leaf_shape)
  if box_a is None or box_b is None:
    return None
  apart = any(ha < lb or hb < la for (la, ha), (lb, hb) in zip(box_a, box_b))
  return "disjoint" if apart else None


class Layout(NamedTuple):
  """A use's ``(H, L, R)`` arrangement of its leaf.

  Attributes:
    shape: ``(H, L, R)``.
    indices: its leaf element indices as :class:`Strided`, or None where they are not
      described exactly (then the use pairs with nothing and is not taken as injective).
  """

  shape: tuple
  indices: Strided | None

  @property
  def injective(self) -> bool:
    """Whether no leaf element is known to appear twice (with an isometric chain)."""
    return self.indices is not None
