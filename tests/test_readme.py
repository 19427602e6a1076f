"""The README's promises: a short landing page whose snippets run and whose commands CI runs."""

import pathlib
import re

import pytest
import snippets

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()

# One short example per area, each calling the area's own functions.
AREAS = {
  "Rescaling and perturbation": ["clipjax.perturb"],
  "optax transformations": ["clipjax.clipping_aware_normalize", "clipjax.clip_by_norm"],
  "Exact projection for PGD": ["clipjax.project_ball_box"],
  "Private SGD": [
    "clipjax.PoissonSampler",
    "clipjax.clipped_grad",
    "clipjax.dp_noise",
    "clipjax.calibrate_noise",
    "clipjax.dp_epsilon",
  ],
}


def _section(heading):
  match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", README, re.S | re.M)
  assert match, f"README has no '## {heading}' section"
  return match.group(1)


def _commands(heading):
  blocks = re.findall(r"```bash\n(.*?)```", _section(heading), re.S)
  return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_is_a_landing_page():
  assert len(README) <= 8000, f"README.md has {len(README)} characters; the limit is 8,000"


def test_quick_start_has_two_commands_and_ci_runs_the_second():
  section = _section("Quick start")
  assert section.count("```bash") == 1, "the Quick start commands belong in one block"
  install_and_demo, install_and_test = _commands("Quick start")
  assert "python -m clipjax" in install_and_demo
  assert "pytest" in install_and_test
  assert install_and_test in CI


def test_docs_build_command_is_the_one_ci_runs():
  (build,) = _commands("Documentation")
  assert "sphinx-build -W" in build
  assert build in CI


def test_one_example_per_area():
  for heading, names in AREAS.items():
    (snippet,) = re.findall(r"```python\n(.*?)```", _section(heading), re.S)
    for name in names:
      assert f"{name}(" in snippet, f"the README's '{heading}' example does not call {name}"


BLOCKS = snippets.python_blocks(README)


@pytest.mark.parametrize("number", range(1, len(BLOCKS) + 1), ids=lambda n: f"README.md:{n}")
def test_snippet_runs_alone(number):
  """Each block as printed, alone, in a fresh interpreter with JAX's default float32."""
  code = BLOCKS[number - 1]
  snippets.check_install_line(f"README.md:{number}", code)
  out = snippets.run(f"README.md:{number}", code, timeout=600)
  if "clipjax.perturb(" in code:
    assert "3.6" in out
  if "clipjax.dp_epsilon(" in code:  # labelled results, not bare numbers
    for label in ("σ =", "ε =", "accuracy"):
      assert label in out, f"the private-SGD snippet prints no {label!r}: {out!r}"
