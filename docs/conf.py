"""Sphinx configuration of clipjax's documentation site (how to build: docs/README.md)."""

import pathlib
import sys

import jax
import optax
from sphinx.util.typing import stringify_annotation

DOCS = pathlib.Path(__file__).resolve().parent
# Document the clipjax of this checkout, also when another copy is installed.
sys.path.insert(0, str(DOCS.parent))

import clipjax  # noqa: E402

project = "clipjax"
author = "the clipjax authors"
copyright = "the clipjax authors"  # noqa: A001 (Sphinx's name for it)
version = release = clipjax.__version__

extensions = [
  "myst_parser",
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.intersphinx",
  "sphinx.ext.mathjax",
  "sphinx.ext.napoleon",
  # MathJax from the package, not a CDN: the site renders its maths offline too.
  "sphinx-mathjax-offline",
]
exclude_patterns = ["_build", "README.md", "_scripts", "_inventories"]
templates_path = ["_templates"]

# Markdown pages: `$...$` and `$$...$$` maths, and anchors for the headings.
myst_enable_extensions = ["amsmath", "deflist", "dollarmath"]
myst_heading_anchors = 3

# The API pages list names in `autosummary` tables; each name gets its own page.
autosummary_generate = True
# Docstrings are Google style only.
napoleon_numpy_docstring = False

# Every reference must resolve (with -W a dangling one fails the build).
nitpicky = True

# Inventories ship with the docs, so the build never needs the network: python.inv is
# CPython 3.11's own; the others are plain-text (version 1) lists of the names these
# pages refer to, with their pages on the projects' sites. docs/README.md says more.
intersphinx_mapping = {
  name: (url, f"_inventories/{name}.inv")
  for name, url in {
    "python": "https://docs.python.org/3/",
    "numpy": "https://numpy.org/doc/stable/",
    "jax": "https://docs.jax.dev/en/latest/",
    "optax": "https://optax.readthedocs.io/en/latest/",
  }.items()
}

html_theme = "sphinx_book_theme"
html_title = "clipjax"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {"show_toc_level": 2}
# One search box: the sidebar's field duplicated the header's search button (which also
# answers Ctrl+K and stays visible when the sidebar is collapsed on small screens).
html_sidebars = {"**": ["navbar-logo.html", "icon-links.html", "sbt-sidebar-nav.html"]}

# `PyTree` (clipjax/_typing.py) is `Any` to Python; signatures show the name, unlinked.
nitpick_ignore = [("py:class", "PyTree")]


# Annotations hold objects, which autodoc names where they are defined
# (jax.jaxlib._jax.Array, optax._src.base.GradientTransformation, a clipjax submodule)
# or spells out (jax.typing.ArrayLike is a Union of eight types). Signatures and
# attribute types show the names that the projects document instead, so that they
# read well and link.
_DOCUMENTED_AS = {
  "PyTree": clipjax._typing.PyTree,
  "jax.typing.ArrayLike": jax.typing.ArrayLike,
  "jax.Array": jax.Array,
  "optax.GradientTransformation": optax.GradientTransformation,
  "optax.GradientTransformationExtraArgs": optax.GradientTransformationExtraArgs,
  **{
    f"clipjax.{name}": getattr(clipjax, name)
    for name in clipjax.__all__
    if isinstance(getattr(clipjax, name), type)
  },
}


def _renames(mode, prefix):
  pairs = [(stringify_annotation(obj, mode), prefix + name) for name, obj in _DOCUMENTED_AS.items()]
  # Longest first: the ArrayLike union contains jax.Array's long name.
  return sorted(pairs, key=lambda pair: -len(pair[0]))


_IN_SIGNATURES = _renames("smart", "~")
_IN_DOCSTRINGS = _renames("fully-qualified-except-typing", "")


def _rename(text, renames):
  for long, short in renames:
    text = text.replace(long, short)
  return text


def _signature_names(app, what, name, obj, options, signature, return_annotation):
  del app, what, name, obj, options
  rename = lambda text: text and _rename(text, _IN_SIGNATURES)
  return rename(signature), rename(return_annotation)


def _docstring_names(app, what, name, obj, options, lines):
  del app, what, name, obj, options
  lines[:] = [_rename(line, _IN_DOCSTRINGS) for line in lines]


def setup(app):
  app.connect("autodoc-process-signature", _signature_names)
  # After napoleon (priority 500), which writes the attribute types.
  app.connect("autodoc-process-docstring", _docstring_names, priority=600)
