"""README.md and docs/*.md point only at things that exist: links, anchors, project paths, utils modules and names.

Checked in every page:
  - relative markdown links and images, `[text](path#anchor)`: the file exists, and an anchor names a heading of it;
  - project paths in code (inline or fenced): anything under utils/, docs/, tests/ or benchmarks/, any *.py
    file, and any other path with a folder that ends in .py/.md/.png/.json; a `tests/x.py::name[id]` test
    reference must also define `name`;
  - `utils.a.b` references (`python -m utils.x`, `from utils.x import Name`, `utils.x.function`): the module
    exists and, where a name follows the module, the module defines it.
Exempt: outputs of a run (results/, toy_world/, out/), placeholders (`<...>`), and bare .md/.png/.json
names, which in these pages are files inside output folders (metrics.md, grid.png, model_index.json).
"""

from __future__ import annotations

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
PROJECT_DIRS = ("utils/", "docs/", "tests/", "benchmarks/")
OUTPUT_DIRS = ("results/", "toy_world/", "out/")
FILE_TYPES = (".py", ".md", ".png", ".json")

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`([^`]+)`")
DOTTED = re.compile(r"(?<![\w./])utils(?:\.\w+)+")
FROM_IMPORT = re.compile(r"from\s+(utils(?:\.\w+)+)\s+import\s+([\w, ]+)")


def split_fences(text: str) -> tuple[str, str]:
    """(prose, code): the page's text outside and inside ``` fenced blocks."""
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        (code if fenced else prose).append(line)
    return "\n".join(prose), "\n".join(code)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but '-' dropped, spaces -> '-'."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: str) -> set[str]:
    """Anchors of the headings of a markdown file (outside code blocks)."""
    with open(path, encoding="utf-8") as f:
        prose, _ = split_fences(f.read())
    return {slug(line.lstrip("#")) for line in prose.splitlines() if re.match(r"#{1,6} ", line)}


def path_tokens(code: str) -> list[str]:
    """Whitespace-separated words of code that look like project paths (quotes, commas and test ids stripped)."""
    found = []
    for word in code.split():
        word = word.strip("\"'(),;:")
        word = word.split("::")[0] if "::" in word else word
        if not word or "<" in word or word.startswith(("-", "$", "http")) or word.startswith(OUTPUT_DIRS):
            continue
        has_dir = "/" in word.rstrip("/")
        if word.startswith(PROJECT_DIRS) or word.endswith(".py") or (has_dir and word.endswith(FILE_TYPES)):
            found.append(word)
    return found


def referenced_tests(code: str) -> list[tuple[str, str]]:
    """(file, test name) of every `tests/x.py::name[...]` in code."""
    return re.findall(r"(tests/[\w/]+\.py)::(\w+)", code)


def module_file(parts: list[str]) -> tuple[str | None, list[str]]:
    """(path of the longest module or package prefix of a dotted name, the remaining names)."""
    for n in range(len(parts), 0, -1):
        base = os.path.join(ROOT, *parts[:n])
        if os.path.isfile(base + ".py"):
            return base + ".py", parts[n:]
        if os.path.isfile(os.path.join(base, "__init__.py")):
            return os.path.join(base, "__init__.py"), parts[n:]
    return None, parts


def defines(module_path: str, name: str) -> bool:
    """Whether a module's source defines `name` (def, class, assignment or import) or it is a submodule."""
    package = os.path.dirname(module_path)
    if module_path.endswith("__init__.py") and os.path.exists(os.path.join(package, name + ".py")):
        return True
    with open(module_path, encoding="utf-8") as f:
        source = f.read()
    pattern = rf"^\s*(?:def|class)\s+{name}\b|^{name}\s*[:=]|^\s*(?:from\s+\S+\s+)?import\s+.*\b{name}\b"
    return re.search(pattern, source, re.MULTILINE) is not None


def dotted_problems(dotted: str, names: tuple[str, ...] = ()) -> list[str]:
    """What is missing for a `utils.a.b` reference (and names imported from it)."""
    path, rest = module_file(dotted.split("."))
    if path is None or (path == os.path.join(ROOT, "utils", "__init__.py") and rest):
        return [f"module `{dotted}`"]
    wanted = rest[:1] + [n.strip() for n in names if n.strip()]
    return [f"`{n}` in `{os.path.relpath(path, ROOT)}`" for n in wanted if not defines(path, n)]


def page_problems(page: str) -> list[str]:
    """Every reference of one page that does not resolve."""
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        text = f.read()
    prose, fenced = split_fences(text)
    here = os.path.dirname(os.path.join(ROOT, page))
    problems = []

    for target in LINK.findall(prose):
        if re.match(r"^[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        path = os.path.normpath(os.path.join(here, file_part)) if file_part else os.path.join(ROOT, page)
        if not os.path.exists(path):
            problems.append(f"link ({target})")
        elif anchor and path.endswith(".md") and anchor not in anchors(path):
            problems.append(f"anchor ({target})")

    code = "\n".join(INLINE_CODE.findall(prose)) + "\n" + fenced
    for word in path_tokens(code):
        if not (glob.glob(os.path.join(ROOT, word)) if "*" in word else os.path.exists(os.path.join(ROOT, word))):
            problems.append(f"path `{word}`")
    for file, name in referenced_tests(code):
        path = os.path.join(ROOT, file)
        if os.path.exists(path) and not defines(path, name):
            problems.append(f"test `{file}::{name}`")
    for module, names in FROM_IMPORT.findall(code):
        problems += dotted_problems(module, tuple(names.split(",")))
    for dotted in DOTTED.findall(FROM_IMPORT.sub("", code)):
        problems += dotted_problems(dotted)
    return sorted(set(problems))


@pytest.mark.parametrize("page", PAGES)
def test_every_reference_exists(page: str):
    problems = page_problems(page)
    assert not problems, f"{page} refers to what does not exist:\n  " + "\n  ".join(problems)


def test_every_page_says_what_it_answers():
    """Each docs page opens with its title, then one line (a paragraph of its own) on what it answers."""
    for page in PAGES[1:]:
        with open(os.path.join(ROOT, page), encoding="utf-8") as f:
            lines = f.read().splitlines() + [""] * 4
        assert lines[0].startswith("# ") and not lines[1].strip(), f"{page} does not start with a title"
        opening, after = lines[2], lines[3]
        assert opening.strip() and not opening.startswith(("#", "|", "```", "-", "!")) and not after.strip(), \
            f"{page}: the line after the title must be one line on what the page answers"


def test_the_checks_catch_what_they_should():
    """The helpers find paths and dotted names and skip outputs and placeholders."""
    code = ("python train_lcm_distill_sd.py --output_dir out/x results/demo/a.png <folder>/y.py "
            "utils/missing.py tests/test_docs.py::test_every_reference_exists[README.md] metrics.md")
    assert path_tokens(code) == ["train_lcm_distill_sd.py", "utils/missing.py", "tests/test_docs.py"]
    assert referenced_tests(code) == [("tests/test_docs.py", "test_every_reference_exists")]
    assert dotted_problems("utils.solvers.ddim_step") == []
    assert dotted_problems("utils.solvers.no_such_function") == ["`no_such_function` in `utils/solvers.py`"]
    assert dotted_problems("utils.no_such_module") == ["module `utils.no_such_module`"]
    assert slug("A larger FLUX shift: `x` (y)") == "a-larger-flux-shift-x-y"
