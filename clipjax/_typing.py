"""Type aliases of the public signatures (the docs show them by name: docs/conf.py)."""

from typing import Annotated, Any

# An array, or nested lists, tuples, dicts and NamedTuples of arrays: anything
# `jax.tree.leaves` flattens. `Any` to type checkers, whose pytree support is partial;
# the annotation gives the docs a name to show.
PyTree = Annotated[Any, "PyTree"]
