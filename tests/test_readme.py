"""The README's promises: its Python snippets run, and CI runs its test command."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _quick_start_commands():
  section = re.search(r"^## Quick start\n(.*?)(?=^## )", README, re.S | re.M).group(1)
  blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
  return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_quick_start_has_two_commands_and_ci_runs_the_second():
  install_and_demo, install_and_test = _quick_start_commands()
  assert "python -m clipjax" in install_and_demo
  assert "pytest" in install_and_test
  assert install_and_test in (ROOT / ".ci" / "run").read_text()


def test_python_snippets_run():
  """All snippets, in order, in one fresh interpreter with JAX's default float32."""
  blocks = re.findall(r"```python\n(.*?)```", README, re.S)
  assert len(blocks) >= 6
  program = "\n".join(blocks)
  result = subprocess.run(
    [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=600
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "3.6" in result.stdout
