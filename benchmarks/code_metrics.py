"""Size and coupling of the code a user reads: prints one JSON object.

    python benchmarks/code_metrics.py

- `recipe_lines`: lines of each recipe script (its loop included);
- `recipe_utils_names`: the distinct utils names each recipe uses: names imported with
  `from utils.x import name`, plus `module.name` attributes of utils modules imported with
  `from utils import module`;
- `recipe_formula_names` / `recipe_other_names`: that count split into the names of the formula modules
  (FORMULA_MODULES: the solvers, scalings, losses, TLCM math and samplers, the algorithm a recipe spells out)
  and all others (loading, flags, the loop's bookkeeping, files);
- `recipe_imported_names`: the names the recipe's `from utils... import` statements bind (modules included);
- `utils_lines`: lines of utils/ without the toy world (utils/toy/);
- `import_cycles`: cycles among the utils modules, counting imports inside functions too.
"""

from __future__ import annotations

import ast
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMULA_MODULES = ("solvers", "consistency", "losses", "tlcm", "scheduling_lcm", "scheduling_tlcm",
                   "scheduling_flow_match_euler_tlcm")
RECIPES = ("train_lcm_distill_sd.py", "train_lcm_distill_lora_sdxl.py", "train_tcd_lora.py", "train_tlcm_flux.py",
           "train_tlcm_sdxl.py")


def utils_modules() -> dict[str, str]:
    """{"utils.x": path} for every module of the utils package, the toy world included."""
    found = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "utils")):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].replace(os.sep, ".")
                found[rel.removesuffix(".__init__")] = os.path.join(folder, name)
    return found


def imported_modules(path: str, module: str, known: set[str]) -> set[str]:
    """The utils modules `path` imports anywhere in its body (absolute or relative imports)."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in known else base)
    return {m for m in out if m in known and m != module}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle found by depth-first search, each reported once (rotated to its smallest name)."""
    found, seen = [], set()

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                cycle = path[path.index(nxt):]
                key = tuple(cycle[cycle.index(min(cycle)):] + cycle[:cycle.index(min(cycle))])
                if key not in seen:
                    seen.add(key)
                    found.append(list(key))
            elif len(path) < 12:
                visit(nxt, path + [nxt])

    for start in sorted(graph):
        visit(start, [start])
    return found


def recipe_names(path: str) -> list[str]:
    """The distinct utils names a script uses (see the module docstring)."""
    tree = ast.parse(open(path).read())
    names, modules = set(), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("utils"):
            for alias in node.names:
                if node.module == "utils":
                    modules[alias.asname or alias.name] = alias.name
                else:
                    names.add(f"{node.module.removeprefix('utils.')}.{alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            names.add(f"{modules[node.value.id]}.{node.attr}")
    return sorted(names)


def imported_names(path: str) -> list[str]:
    """The names bound by a script's `from utils... import a, b` statements."""
    return sorted({alias.asname or alias.name for node in ast.walk(ast.parse(open(path).read()))
                   if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("utils")
                   for alias in node.names})


def main() -> None:
    known = utils_modules()
    graph = {m: imported_modules(p, m, set(known)) for m, p in known.items()}
    lines = {m: sum(1 for _ in open(p)) for m, p in known.items()}
    recipes = [r for r in RECIPES if os.path.exists(os.path.join(ROOT, r))]
    print(json.dumps({
        "recipe_lines": {r: sum(1 for _ in open(os.path.join(ROOT, r))) for r in recipes},
        "recipe_utils_names": {r: len(recipe_names(os.path.join(ROOT, r))) for r in recipes},
        "recipe_formula_names": {r: len([n for n in recipe_names(os.path.join(ROOT, r))
                                         if n.split(".")[0] in FORMULA_MODULES]) for r in recipes},
        "recipe_other_names": {r: len([n for n in recipe_names(os.path.join(ROOT, r))
                                       if n.split(".")[0] not in FORMULA_MODULES]) for r in recipes},
        "recipe_imported_names": {r: len(imported_names(os.path.join(ROOT, r))) for r in recipes},
        "utils_lines": sum(n for m, n in lines.items() if not m.startswith("utils.toy")),
        "utils_modules": len([m for m in known if not m.startswith("utils.toy")]),
        "import_cycles": cycles(graph),
        "names": {r: recipe_names(os.path.join(ROOT, r)) for r in recipes} if "-v" in sys.argv else None,
    }, indent=1))


if __name__ == "__main__":
    main()
