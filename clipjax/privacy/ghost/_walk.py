"""The per-example program: where parameters meet data, and one tapped evaluation of it.

:func:`find_uses` follows every value of the traced per-example loss from the parameter
leaves and the example's data, and asks the rule registered for the equation's
primitive (``_rules.register_rule``) about every equation where a parameter (possibly
reshaped, transposed, sliced or cast: a *view* of one leaf) meets data. It looks
inside ``jit`` calls, ``checkpoint`` (remat) bodies and ``scan`` bodies: there a leaf
closed over by the body is *shared* by the iterations, and a leaf scanned over
(stacked layers) is *sliced*, one slice per iteration. A value computed from leaves
and constants only (a fused kernel, ``w * g``, ``v / ‖v‖``) is *derived*: followed, with
a recipe that recomputes it from the leaves, to the rule that takes it, where it becomes
a *virtual* leaf of its own (``_leaves`` pulls its gradient back). Every other way of using a
leaf (an equation no rule takes, a ``cond`` or ``while`` body, a ``custom_jvp`` /
``custom_vjp`` call, whose gradient its own rule defines) puts that leaf *in the
pass*, with the reason (``clipjax.privacy.ghost.plan`` reports it): its per-example gradient
is taken by the batched backward pass itself, which costs what ``vmap(grad)`` costs
for that leaf and no more.

:func:`evaluate` re-evaluates the program with a zero *tap* added to the output of
every recognised use (stacked over the iterations of enclosing scans) and records the
use's data operands, so that one backward pass gives every use's output cotangent.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core
from jax.extend.core import primitives as prims

from clipjax.privacy.ghost import _layout, _rules

# Provenance of a value (a `View` is the fourth kind).
CONST = "const"  # depends on neither parameters nor the example
PARAMS = "params"  # depends on parameters only, other than as a view of one leaf
DATA = "data"  # depends on the example

_ORDER = {CONST: 0, PARAMS: 1, DATA: 2}

# Equations that keep a value a view of one leaf: replaying them on the leaf and taking
# their VJP maps gradients back to it. The isometric ones also preserve norms.
_ELEMENTWISE = frozenset({prims.convert_element_type_p, prims.copy_p, prims.reduce_precision_p})
_ISOMETRIC = _ELEMENTWISE | {prims.reshape_p, prims.transpose_p, prims.squeeze_p, prims.slice_p}
_VIEWS = _ISOMETRIC | {prims.broadcast_in_dim_p}
# Structural equations whose bodies are analysed (and evaluated with taps inside).
_CALLS = frozenset({prims.jit_p, prims.closed_call_p})
# ``remat_p`` is public in jax.extend from JAX 0.8; before, it is read off a traced
# checkpoint (only there: tracing at import costs every user start-up time).
_REMAT = frozenset(
  {
    getattr(prims, "remat_p", None)
    or jax.make_jaxpr(jax.checkpoint(lambda x: x))(0.0).eqns[0].primitive
  }
)
_SCAN = prims.scan_p
# Why a leaf used by these equations is taken in the pass.
_OPAQUE = {
  prims.cond_p: "used inside `cond` (branches are not analysed)",
  prims.while_p: "used inside `while_loop` (its body is not analysed)",
  prims.custom_jvp_call_p: "used inside a `custom_jvp` function (its gradient is its own)",
  prims.custom_vjp_call_p: "used inside a `custom_vjp` function (its gradient is its own)",
}


# Elementwise arithmetic with data: biases, normalization scales. No rule is needed, by
# design: the per-example gradient is as small as the leaf, formed in the pass.
_ELEMENTWISE_USES = frozenset({prims.add_p, prims.sub_p, prims.mul_p, prims.div_p})
BY_DESIGN = "elementwise"  # how the reasons of such uses start


class _Slice(NamedTuple):
  """A ``slice`` equation standing for one output of a ``split`` (in a view's chain)."""

  primitive: Any
  params: dict
  outvars: list


def _split_slices(eqn) -> list:
  """``split``'s outputs as slices of its operand (a fused QKV kernel, say): each a view."""
  shape, axis = eqn.invars[0].aval.shape, eqn.params["axis"]
  slices, start = [], 0
  for v in eqn.outvars:
    stop = start + v.aval.shape[axis]
    starts = [start if a == axis else 0 for a in range(len(shape))]
    limits = [stop if a == axis else n for a, n in enumerate(shape)]
    slices.append(
      _Slice(
        prims.slice_p, {"start_indices": starts, "limit_indices": limits, "strides": None}, [v]
      )
    )
    start = stop
  return slices


def _callee(eqn):
  """The closed jaxpr a call equation runs."""
  return eqn.params["jaxpr"] if "jaxpr" in eqn.params else eqn.params["call_jaxpr"]


class View(NamedTuple):
  """A value obtained from parameter leaf ``leaf`` by the view equations ``chain``.

  ``scanned`` has one flag per enclosing ``scan``: True where that scan runs over the
  leaf's leading axis (then ``chain`` applies to one slice of the leaf).
  """

  leaf: int
  chain: tuple
  scanned: tuple


class Use(NamedTuple):
  """A recognised use ``eqn(..., view(leaf), ...)`` of a leaf with per-example data.

  Attributes:
    rule: the rule that recognised it.
    leaf: index of the parameter leaf.
    path: equation indices through enclosing calls and scans: the key of its tap.
    eqn: the equation.
    position: operand index of the parameter view.
    chain: view equations from the leaf (or its slice) to that operand.
    scanned: per enclosing scan, whether the leaf is scanned over (sliced) there.
    lengths: per enclosing scan, its number of iterations.
  """

  rule: Any
  leaf: int
  path: tuple
  eqn: Any
  position: int
  chain: tuple
  scanned: tuple
  lengths: tuple

  @property
  def isometric(self) -> bool:
    """Whether the chain preserves norms (so the use's norm is the leaf gradient's)."""
    return all(_isometric(e) for e in self.chain)

  @property
  def data(self) -> list:
    """The equation's other operands (their per-example values are recorded)."""
    return [v for i, v in enumerate(self.eqn.invars) if i != self.position]


class Derived(NamedTuple):
  """A value computed from parameter leaves and constants only, other than as a view of
  one leaf: fused kernels (``concatenate``), ``w * g``, ``v / ‖v‖``, a flipped kernel.

  Attributes:
    sources: ``(leaf, scanned)`` per leaf it is computed from (``scanned`` as for a
      :class:`View`, at the level where it is used).
    recipe: how to compute it from the leaves' values at that level (see :func:`run`).
    names: the primitives on the way from the leaves, for ``plan``.
  """

  sources: tuple
  recipe: tuple
  names: tuple

  @property
  def key(self) -> tuple:
    """The same derived value, however often the analysis meets it (scan bodies are
    analysed to a fixed point): the equation that made it, and its leaves."""
    _, eqn, index, _ = self.recipe
    return (id(eqn), index, tuple(k for k, _ in self.sources))


class Virtual(NamedTuple):
  """A derived value that a rule takes as its parameter operand, treated as a leaf of
  its own (index ``n_leaves + j``): its per-example gradient is pulled back to
  ``sources`` through the VJP of :func:`virtual_value`."""

  sources: tuple
  recipe: tuple
  names: tuple

  @property
  def scanned(self) -> tuple:
    """Per enclosing scan, whether it runs over the value's leading axis (some source is
    sliced there: the value is then stacked over that scan's iterations)."""
    return _stacked(self.sources)


def _stacked(sources) -> tuple:
  """Per enclosing scan, whether any of ``(leaf, scanned)`` ``sources`` is sliced there."""
  return tuple(any(level) for level in zip(*(s for _, s in sources)))


def _isometric(eqn) -> bool:
  if eqn.primitive in _ISOMETRIC:
    return True
  # broadcast_in_dim that only adds unit axes (expand_dims) moves no value twice.
  return eqn.primitive is prims.broadcast_in_dim_p and (
    np.prod(eqn.outvars[0].aval.shape) == np.prod(eqn.invars[0].aval.shape)
  )


def _join(provenances) -> str:
  kinds = [PARAMS if isinstance(p, (View, Derived)) else p for p in provenances]
  return max(kinds, key=_ORDER.__getitem__, default=CONST)


def _kind(p) -> str:
  return "view" if isinstance(p, (View, Derived)) else p


def _read(env, v):
  return CONST if isinstance(v, jex_core.Literal) else env[v]


class _Found:
  """What the analysis collects: the recognised uses, and the leaves taken in the pass
  with the reasons why."""

  def __init__(self, n_leaves: int, virtuals: dict | None = None):
    self.n_leaves = n_leaves
    self.uses = []
    self.in_pass = {}  # leaf -> reasons, in the order met
    self.virtuals = {} if virtuals is None else virtuals  # Derived.key -> (index, Virtual)

  def give_up(self, provenances, reason: str):
    for p in provenances:
      if isinstance(p, Derived):
        self.give_up([View(k, (), ()) for k, _ in p.sources], reason)
      elif isinstance(p, View):
        reasons = self.in_pass.setdefault(p.leaf, [])
        if reason not in reasons:
          reasons.append(reason)

  def virtual(self, derived: Derived) -> View:
    """The virtual leaf standing for ``derived`` (one per derived value), as a view."""
    key = derived.key
    if key not in self.virtuals:
      virtual = Virtual(derived.sources, derived.recipe, derived.names)
      self.virtuals[key] = (self.n_leaves + len(self.virtuals), virtual)
    index, _ = self.virtuals[key]
    return View(index, (), _stacked(derived.sources))

  def merge(self, other):
    self.uses += other.uses
    for leaf, reasons in other.in_pass.items():
      for reason in reasons:
        self.give_up([View(leaf, (), ())], reason)


def _why(eqn, kinds, rule) -> str:
  """Why a use of a leaf by ``eqn`` (no view equation, no match) is taken in the pass."""
  name = eqn.primitive.name
  if eqn.primitive in _OPAQUE:
    return _OPAQUE[eqn.primitive]
  if "data" not in kinds:
    return f"transformed by `{name}` before use"
  if eqn.primitive in _ELEMENTWISE_USES and rule is None:
    return f"{BY_DESIGN} `{name}` with data (a small per-example gradient, by design)"
  if rule is not None:
    return f"`{name}` use not recognised by its rule ({type(rule).__name__})"
  return f"used by `{name}`, which has no rule (see clipjax.privacy.ghost.register_rule)"


def _literal(v):
  return ("value", v.val)


def _derive(eqn, ins, recipes):
  """The outputs of ``eqn`` applied to parameters (some views or derived) and
  constants, all of known recipes: derived values."""
  sources, names = {}, [eqn.primitive.name]
  for p in ins:
    if isinstance(p, View):
      sources.setdefault(p.leaf, p.scanned)
    elif isinstance(p, Derived):
      sources.update(p.sources)
      names = [n for n in p.names if n not in names] + names
  out = []
  for i in range(len(eqn.outvars)):
    recipe = ("eqn", eqn, i, tuple(recipes))
    out.append(Derived(tuple(sorted(sources.items())), recipe, tuple(names)))
  return out


def _analyse(jaxpr, provenances, recipes, consts, path, lengths, found) -> tuple[list, list]:
  """Collects uses and leaves for the pass into ``found``; returns the outputs'
  provenances and recipes.

  ``recipes`` (one per input, None where unknown) say how a value that does not
  depend on the example is computed from the leaves (see :func:`run`); ``consts`` are
  the values of ``jaxpr.constvars``.
  """
  env = dict(zip(jaxpr.invars, provenances))
  env.update((v, CONST) for v in jaxpr.constvars)
  how = dict(zip(jaxpr.invars, recipes))
  how.update((v, ("value", c)) for v, c in zip(jaxpr.constvars, consts))

  def recipe(v):
    return _literal(v) if isinstance(v, jex_core.Literal) else how.get(v)

  for i, eqn in enumerate(jaxpr.eqns):
    here = path + (i,)
    ins = [_read(env, v) for v in eqn.invars]
    in_recipes = [recipe(v) for v in eqn.invars]
    prim = eqn.primitive
    out_recipes = [None] * len(eqn.outvars)
    if prim in _CALLS:
      closed = _callee(eqn)
      outs, out_recipes = _analyse(
        closed.jaxpr, ins, in_recipes, closed.consts, here, lengths, found
      )
    elif prim in _REMAT:
      outs, out_recipes = _analyse(eqn.params["jaxpr"], ins, in_recipes, [], here, lengths, found)
    elif prim is _SCAN:
      outs = _analyse_scan(eqn, ins, in_recipes, here, lengths, found)
    else:
      if DATA not in ins and all(r is not None for r in in_recipes):
        out_recipes = [("eqn", eqn, j, tuple(in_recipes)) for j in range(len(eqn.outvars))]
      if prim in _VIEWS and len(ins) == 1 and isinstance(ins[0], View):
        view = ins[0]
        outs = [View(view.leaf, view.chain + (eqn,), view.scanned)]
      elif prim is lax.split_p and isinstance(ins[0], View):
        view = ins[0]
        outs = [View(view.leaf, view.chain + (s,), view.scanned) for s in _split_slices(eqn)]
      else:
        rule = _rules.rule_for(prim)
        kinds = [_kind(p) for p in ins]
        position = rule.match(eqn, kinds) if rule else None
        derived = any(isinstance(p, (View, Derived)) for p in ins)
        if position is not None:
          view = ins[position]
          if isinstance(view, Derived):
            view = found.virtual(view)
          found.uses.append(
            Use(rule, view.leaf, here, eqn, position, view.chain, view.scanned, lengths)
          )
          outs = [DATA] * len(eqn.outvars)
        elif derived and out_recipes[0] is not None:
          # Parameters transformed before use: followed to where a rule takes them.
          outs = _derive(eqn, ins, in_recipes)
        else:
          found.give_up(ins, _why(eqn, kinds, rule))
          outs = [_join(ins)] * len(eqn.outvars)
    env.update(zip(eqn.outvars, outs))
    how.update((v, r) for v, r in zip(eqn.outvars, out_recipes) if r is not None)
  return [_read(env, v) for v in jaxpr.outvars], [recipe(v) for v in jaxpr.outvars]


def _analyse_scan(eqn, ins, recipes, path, lengths, found) -> list:
  """A scan: closed-over views are shared by the iterations, scanned-over views sliced."""
  n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
  closed = eqn.params["jaxpr"]
  inner, inner_recipes = [], []
  for j, (p, r) in enumerate(zip(ins, recipes)):
    if j >= n_consts:
      r = None
    if isinstance(p, View):
      if j < n_consts:
        p = View(p.leaf, p.chain, p.scanned + (False,))
      elif j >= n_consts + n_carry and all(e.primitive in _ELEMENTWISE for e in p.chain):
        # Elementwise views commute with slicing: the chain applies to the slice, and
        # so does its recipe (the leaf's value at that level is the slice).
        p, r = View(p.leaf, p.chain, p.scanned + (True,)), recipes[j]
      else:
        carried = j < n_consts + n_carry
        found.give_up([p], "carried through a `scan`" if carried else "viewed, then scanned over")
        p = PARAMS
    elif isinstance(p, Derived):
      if j < n_consts:
        p = p._replace(sources=tuple((k, s + (False,)) for k, s in p.sources))
      else:
        found.give_up([p], "transformed, then carried through or scanned over by a `scan`")
        p = PARAMS
    inner.append(p)
    inner_recipes.append(r)
  inner_lengths = lengths + (eqn.params["length"],)
  # The carry's provenance is the join over iterations: iterate to the fixed point
  # (the lattice has three levels), then collect from the last run only.
  while True:
    trial = _Found(found.n_leaves, found.virtuals)
    outs, _ = _analyse(
      closed.jaxpr, inner, inner_recipes, closed.consts, path, inner_lengths, trial
    )
    carry = [_join([a, b]) for a, b in zip(inner[n_consts : n_consts + n_carry], outs[:n_carry])]
    if carry == inner[n_consts : n_consts + n_carry]:
      break
    inner[n_consts : n_consts + n_carry] = carry
  found.merge(trial)
  found.give_up(outs, "passed out of a `scan`")
  return [_join([p]) for p in outs]


class Analysis(NamedTuple):
  """What :func:`find_uses` finds.

  Attributes:
    uses: the recognised uses of leaves outside the pass (a virtual leaf's index
      follows the parameter leaves').
    in_pass: the leaves in the pass, sorted.
    reasons: per leaf in the pass, why it is there.
    virtuals: the virtual leaves, in index order.
  """

  uses: list
  in_pass: list
  reasons: dict
  virtuals: list


def find_uses(closed, n_leaves: int, n_data: int) -> Analysis:
  """Where the leaves (and values derived from them) meet the example's data."""
  found = _Found(n_leaves)
  provenances = [View(k, (), ()) for k in range(n_leaves)] + [DATA] * n_data
  recipes = [("leaf", k) for k in range(n_leaves)] + [None] * n_data
  outs, _ = _analyse(closed.jaxpr, provenances, recipes, closed.consts, (), (), found)
  found.give_up(outs, "returned by the loss function (as the loss or in aux)")
  # Virtual leaves whose sources are all in the pass need nothing more; the others are
  # renumbered in order after the parameter leaves.
  used = sorted({u.leaf for u in found.uses if u.leaf >= n_leaves})
  by_index = dict(found.virtuals.values())
  virtuals, renumber = [], {}
  for index in used:
    v = by_index[index]
    if any(k not in found.in_pass for k, _ in v.sources):
      renumber[index] = n_leaves + len(virtuals)
      virtuals.append(v)
  uses = []
  for u in found.uses:
    if u.leaf < n_leaves and u.leaf not in found.in_pass:
      uses.append(u)
    elif u.leaf in renumber:
      uses.append(u._replace(leaf=renumber[u.leaf]))
  return Analysis(uses, sorted(found.in_pass), dict(found.in_pass), virtuals)


def run(recipe, values: dict, memo: dict):
  """A recipe's value from the leaves' ``values`` (at the level it was recorded: a
  scanned-over leaf's slice). A recipe is ``("leaf", k)``, ``("value", constant)`` or
  ``("eqn", eqn, output, input_recipes)``; ``memo`` shares common subexpressions."""
  key = id(recipe)
  if key not in memo:
    kind = recipe[0]
    if kind == "leaf":
      memo[key] = values[recipe[1]]
    elif kind == "value":
      memo[key] = recipe[1]
    else:
      _, eqn, index, ins = recipe
      if id(eqn) not in memo:
        memo[id(eqn)] = bind(eqn, [run(r, values, memo) for r in ins])
      memo[key] = memo[id(eqn)][index]
  return memo[key]


def virtual_value(virtual: Virtual, *values):
  """The virtual leaf's value from its sources' values (in the order of ``sources``):
  the recipe, mapped over the iterations of every enclosing scan that slices one."""
  fn = lambda values: run(virtual.recipe, values, {})
  flags = virtual.scanned
  for level in reversed(range(len(flags))):
    if flags[level]:
      axes = {k: 0 if s[level] else None for k, s in virtual.sources}
      fn = jax.vmap(fn, in_axes=(axes,))
  return fn({k: x for (k, _), x in zip(virtual.sources, values)})


# Recipe equations whose VJP maps a gradient to one of its input's elements each, or to
# the pieces of a concatenation: norms are preserved if no leaf is reached twice.
_REARRANGING = frozenset(
  {prims.reshape_p, prims.transpose_p, prims.squeeze_p, prims.rev_p, prims.copy_p}
)


def isometric(virtual: Virtual) -> bool:
  """Whether the virtual leaf's pull-back preserves norms: a concatenation (or
  rearrangement, slice) of distinct leaves, in one dtype, all sliced alike by scans."""
  seen = []

  def walk(recipe) -> bool:
    if recipe[0] == "leaf":
      seen.append(recipe[1])
      return True
    if recipe[0] != "eqn":
      return False
    _, eqn, _, ins = recipe
    prim = eqn.primitive
    same_dtype = all(v.aval.dtype == eqn.outvars[0].aval.dtype for v in eqn.invars)
    ok = (
      prim in _REARRANGING
      or prim in (prims.slice_p, lax.split_p, prims.concatenate_p)
      or (prim is prims.broadcast_in_dim_p and _isometric(eqn))
      or prim is prims.convert_element_type_p
    )
    return ok and same_dtype and all(walk(r) for r in ins)

  flags = {s for _, s in virtual.sources}
  return walk(virtual.recipe) and len(seen) == len(set(seen)) and len(flags) == 1


# ---------------------------------------------------------------------------
# Tapped evaluation
# ---------------------------------------------------------------------------


def _inside(taps, path):
  """The tap keys under ``path``, in a fixed order."""
  return [k for k in taps if k[: len(path)] == path and len(k) > len(path)]


def bind(eqn, ins):
  bound = eqn.primitive.get_bind_params(eqn.params)
  # JAX 0.7 returns (subfuns, params), later versions the params alone.
  subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
  with eqn.ctx.manager:
    outs = eqn.primitive.bind(*subfuns, *ins, **params)
  return outs if eqn.primitive.multiple_results else [outs]


def evaluate(jaxpr, consts, args, path, taps, records) -> list:
  """Evaluates ``jaxpr``, adding ``taps[path]`` to the outputs of tapped equations.

  ``records[path]`` receives a tapped equation's data operands (stacked over enclosing
  scans, as its tap is). Calls, remat bodies and scans without taps inside are bound
  as they are.
  """
  env = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  for i, eqn in enumerate(jaxpr.eqns):
    here = path + (i,)
    ins = [read(v) for v in eqn.invars]
    inner = _inside(taps, here)
    if not inner:
      outs = bind(eqn, ins)
      if here in taps:
        position = taps[here][1]
        records[here] = [x for j, x in enumerate(ins) if j != position]
        outs = [outs[0] + taps[here][0]]
    elif eqn.primitive in _CALLS:
      closed = _callee(eqn)
      outs = evaluate(closed.jaxpr, closed.consts, ins, here, taps, records)
    elif eqn.primitive in _REMAT:
      outs = _evaluate_remat(eqn, ins, here, inner, taps, records)
    else:  # scan
      outs = _evaluate_scan(eqn, ins, here, inner, taps, records)
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


class _Shared:
  """Records leave a body once per value: the layers of an LSTM cell read the same
  input and hidden state (four uses, one record each), and XLA merges the identical
  Gram products computed from one array, not from four copies."""

  def __init__(self):
    self.index = None

  def pack(self, recs, inner) -> list:
    values, ids, self.index = [], {}, []
    for k in inner:
      positions = []
      for x in recs[k]:
        if id(x) not in ids:
          ids[id(x)] = len(values)
          values.append(x)
        positions.append(ids[id(x)])
      self.index.append(positions)
    return values

  def unpack(self, values, inner, records):
    for k, positions in zip(inner, self.index):
      records[k] = [values[j] for j in positions]


def _evaluate_remat(eqn, ins, path, inner, taps, records):
  """A remat body stays rematerialised: its records are outputs, everything else is not."""
  shared = _Shared()

  def body(ins, inner_taps):
    tap_map = {k: (t, taps[k][1]) for k, t in zip(inner, inner_taps)}
    recs = {}
    outs = evaluate(eqn.params["jaxpr"], [], ins, path, tap_map, recs)
    return outs, shared.pack(recs, inner)

  fn = jax.checkpoint(body, prevent_cse=eqn.params["prevent_cse"], policy=eqn.params["policy"])
  outs, recs = fn(ins, [taps[k][0] for k in inner])
  shared.unpack(recs, inner, records)
  return outs


def _evaluate_scan(eqn, ins, path, inner, taps, records):
  """A scan whose taps and records are extra scanned inputs and stacked outputs."""
  n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
  closed = eqn.params["jaxpr"]
  consts, carry, xs = ins[:n_consts], ins[n_consts : n_consts + n_carry], ins[n_consts + n_carry :]

  shared = _Shared()

  def body(carry, x):
    x, inner_taps = x
    tap_map = {k: (t, taps[k][1]) for k, t in zip(inner, inner_taps)}
    recs = {}
    outs = evaluate(closed.jaxpr, closed.consts, [*consts, *carry, *x], path, tap_map, recs)
    return outs[:n_carry], (outs[n_carry:], shared.pack(recs, inner))

  carry, (ys, recs) = lax.scan(
    body,
    carry,
    (xs, [taps[k][0] for k in inner]),
    length=eqn.params["length"],
    reverse=eqn.params["reverse"],
    unroll=eqn.params["unroll"],
  )
  shared.unpack(recs, inner, records)
  return [*carry, *ys]


# ---------------------------------------------------------------------------
# Replaying views
# ---------------------------------------------------------------------------


def replay_layout(chain, x):
  """``chain`` applied to ``x`` as a pure rearrangement (casts skipped): in JAX for
  values, or on a ``_layout.Strided`` description of the leaf's element indices."""
  for eqn in chain:
    name, p = eqn.primitive.name, eqn.params
    if name == "reshape":
      if p.get("dimensions") is not None:
        x = x.transpose(p["dimensions"])
      x = x.reshape(p["new_sizes"])
    elif name == "transpose":
      x = x.transpose(p["permutation"])
    elif name == "squeeze":
      x = x.reshape(eqn.outvars[0].aval.shape)
    elif name == "slice":
      strides = p["strides"] or (1,) * x.ndim
      x = x[
        tuple(slice(a, b, s) for a, b, s in zip(p["start_indices"], p["limit_indices"], strides))
      ]
    elif name == "broadcast_in_dim":
      if isinstance(x, _layout.Strided):
        x = x.broadcast_in_dim(p["shape"], p["broadcast_dimensions"])
        continue
      shape = list(p["shape"])
      expanded = [1] * len(shape)
      for axis, d in zip(p["broadcast_dimensions"], x.shape):
        expanded[axis] = d
      x = jnp.broadcast_to(x.reshape(expanded), shape)
    elif eqn.primitive not in _ELEMENTWISE:
      raise NotImplementedError(name)  # find_uses admits no other view equation
  return x
