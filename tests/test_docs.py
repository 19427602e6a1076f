"""The documentation's promises: every public name has a reference entry, every Python
snippet runs alone as printed and says what to install, and the images stay small.

The site itself is built by `.ci/run` (`sphinx-build -W`, which fails on a broken
reference, a missing image or a page outside the table of contents); these tests need
no Sphinx.
"""

import importlib.util
import pathlib
import re

import pytest
import snippets

import clipjax

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


# The site's pages with Python snippets (not the built output, nor the generated API stubs).
PAGES = sorted(
  path
  for path in DOCS.rglob("*.md")
  if not {"_build", "_autosummary"} & set(path.parts) and snippets.python_blocks(path.read_text())
)
SNIPPETS = [
  (f"{page.relative_to(DOCS)}:{number}", code)
  for page in PAGES
  for number, code in enumerate(snippets.python_blocks(page.read_text()), 1)
]


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


@pytest.mark.parametrize(("name", "code"), SNIPPETS, ids=[name for name, _ in SNIPPETS])
def test_snippet_runs_alone(name, code):
  """Each block as printed, alone, in a fresh interpreter: a reader copies one, not a page."""
  snippets.check_install_line(name, code)
  snippets.run(name, code)


def test_images_are_small():
  sizes = {p.name: p.stat().st_size for p in (DOCS / "_static").glob("*.png")}
  large = {name: size for name, size in sizes.items() if size > 200_000}
  assert not large, f"docs/_static images over 200 KB: {large}"


def test_benchmark_tables_are_generated_from_the_results():
  """README and guide tables equal what docs/_scripts/tables.py makes of benchmarks/results."""
  spec = importlib.util.spec_from_file_location("tables", DOCS / "_scripts" / "tables.py")
  tables = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tables)
  for page in tables.PAGES:
    text = (ROOT / page).read_text()
    assert "<!-- tables.py:" in text, f"{page} has no generated table"
    assert tables.render(text) == text, f"stale table in {page}: run docs/_scripts/tables.py"
