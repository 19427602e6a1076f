"""The package's module import graph, and every import of a private name (``_x``) defined
in another clipjax module, from the source (``ast``; nothing is imported).

Run from the repository root: ``python docs/_scripts/import_graph.py [--graph]``.
"""

import ast
import pathlib
import sys


def _modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
  out = {}
  for path in root.rglob("*.py"):
    name = ".".join(path.with_suffix("").parts)
    out[name.removesuffix(".__init__")] = path
  return out


def main(argv) -> int:
  modules = _modules(pathlib.Path("clipjax"))
  graph, private = {}, []
  for name, path in sorted(modules.items()):
    for node in ast.walk(ast.parse(path.read_text())):
      if not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("clipjax")):
        continue
      for alias in node.names:
        target = f"{node.module}.{alias.name}"
        graph.setdefault(name, set()).add(target if target in modules else node.module)
        if target not in modules and alias.name.startswith("_") and node.module != name:
          private.append(f"{name} imports {node.module}.{alias.name}")
  if "--graph" in argv:
    for name in sorted(graph):
      print(f"{name} -> {', '.join(sorted(graph[name]))}")
  print(*private, sep="\n")
  print(f"{len(private)} imports of another module's private names")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
