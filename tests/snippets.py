"""Running the README's and the docs' Python blocks one by one, as a reader would."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The first line of every block: the install command it needs, e.g.
#   # Requires: pip install -e .
#   # Requires: pip install -e ".[privacy]" flax
INSTALL = re.compile(
  r'# Requires: pip install -e (?:\.|"\.\[(?P<extras>[a-z,]+)\]")(?P<packages>(?: [\w-]+)*)$'
)
# What a call or an import needs beyond the core install: the package, and the extras
# that provide it (or the package named on the install line).
NEEDS = {
  r"\bclipjax\.(dp_epsilon|calibrate_noise)\(": ("dp-accounting", {"privacy", "examples"}),
  r"\bclipjax\.(correlated_noise|calibrate_correlated_noise|correlated_epsilon"
  r"|banded_strategy|blt_strategy)\(": ("jax-privacy", {"correlated"}),
  r"\bclipjax\.(save_checkpoint|restore_checkpoint)\(": ("orbax-checkpoint", {"checkpoint"}),
  r"^(import|from) flax\b": ("flax", set()),
  r"^(import|from) equinox\b": ("equinox", set()),
  r"^(import|from) sklearn\b": ("scikit-learn", {"examples"}),
  r"^(import|from) matplotlib\b": ("matplotlib", {"examples"}),
}


def python_blocks(text):
  return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def check_install_line(name, code):
  """The block's first line names an install command that provides what the block uses."""
  first = code.splitlines()[0]
  match = INSTALL.match(first)
  assert match, f"{name}: the first line must be `# Requires: pip install -e ...`, got {first!r}"
  extras = set((match.group("extras") or "").split(","))
  packages = set(match.group("packages").split())
  for pattern, (package, provided_by) in NEEDS.items():
    if re.search(pattern, code, re.M):
      assert extras & provided_by or package in packages, (
        f"{name} needs {package}, which its install line {first!r} does not provide"
      )


def run(name, code, timeout=300):
  """Runs ``code`` in a fresh interpreter from the repository root; returns its stdout."""
  result = subprocess.run(
    [sys.executable, "-c", code],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert result.returncode == 0, f"{name} fails run alone:\n{result.stderr[-3000:]}"
  return result.stdout
