"""The documentation's promises: every public name has a reference entry, every page's
Python snippets run, and its images stay small.

The site itself is built by `.ci/run` (`sphinx-build -W`, which fails on a broken
reference, a missing image or a page outside the table of contents); these tests need
no Sphinx.
"""

import pathlib
import re
import subprocess
import sys

import pytest

import clipjax

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _python_blocks(text):
  return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


# The site's pages with Python snippets (not the built output, nor the generated API stubs).
PAGES = sorted(
  path
  for path in DOCS.rglob("*.md")
  if not {"_build", "_autosummary"} & set(path.parts) and _python_blocks(path.read_text())
)


def _documented_names():
  """Names listed in the API pages' autosummary tables (under `.. currentmodule:: clipjax`)."""
  names = set()
  for page in (DOCS / "api").glob("*.md"):
    for block in re.findall(r"\.\. autosummary::\n(.*?)(?:^```|\Z)", page.read_text(), re.S | re.M):
      names.update(
        line.strip()
        for line in block.splitlines()
        if line.strip() and not line.strip().startswith(":")
      )
  return names


def test_every_public_name_has_a_reference_entry():
  missing = sorted(set(clipjax.__all__) - _documented_names())
  assert not missing, (
    f"names in clipjax.__all__ with no entry in docs/api/*.md: {missing}. "
    "Add each, one line, to the autosummary list of its group's page."
  )


def test_reference_entries_are_public_names():
  stale = sorted(_documented_names() - set(clipjax.__all__))
  assert not stale, f"docs/api/*.md lists names that clipjax.__all__ does not export: {stale}"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_page_snippets_run(page):
  """A page's Python blocks, in order, in one fresh interpreter with JAX's default float32."""
  result = subprocess.run(
    [sys.executable, "-c", "\n".join(_python_blocks(page.read_text()))],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, f"{page.relative_to(ROOT)}:\n{result.stderr[-3000:]}"


def test_images_are_small():
  sizes = {p.name: p.stat().st_size for p in (DOCS / "_static").glob("*.png")}
  large = {name: size for name, size in sizes.items() if size > 200_000}
  assert not large, f"docs/_static images over 200 KB: {large}"
