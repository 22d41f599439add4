"""The Bazel BUILD files stay in step with the code, so a new module cannot be forgotten.

- every module under place_tf/ and pipelines/ is in the srcs of exactly one py_library;
- every tools/*.py script is the main of exactly one py_binary;
- every py_library / py_binary / py_test lists as deps exactly the project targets its
  sources import (lazy imports inside functions count; `if TYPE_CHECKING:` ones do not),
  and the packages those imports pass through (`place_tf/__init__.py`, ...) are reachable;
- no dependency cycles (modules that import each other must share one target);
- //tests:fast lists every py_test that is not tagged slow.

A failure names the file, the target and the BUILD file to edit, with the fix.

BUILD files are Python syntax, so they are read with `ast` (a small Starlark subset:
calls, assignments, lists, `+`, glob); no Bazel is needed. Only the last test, marked slow,
runs Bazel itself (tools/bazel_test.sh, i.e. `make bazel-test`).
"""

from __future__ import annotations

import ast
import dataclasses
import fnmatch
import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Directories that are Python packages of the project: their modules must be in libraries.
LIBRARY_ROOTS = ("place_tf", "pipelines")
# Where BUILD files live (besides the root one).
BUILD_ROOTS = ("place_tf", "pipelines", "tools", "tests")
PY_RULES = ("py_library", "py_binary", "py_test")


@dataclasses.dataclass
class Rule:
    kind: str
    label: str
    build_file: str
    srcs: list[str]  # repo-relative paths
    deps: list[str]  # normalized labels
    tags: list[str]
    tests: list[str]
    main: str | None


class BuildError(Exception):
    pass


def _package_of(build_file: str) -> str:
    parent = os.path.dirname(build_file)
    return "" if parent in ("", ".") else parent


def normalize_label(label: str, pkg: str) -> str:
    """'//a/b' -> '//a/b:b', ':x' / 'x' -> '//pkg:x'; external labels are kept."""
    if label.startswith("@"):
        return label
    if label.startswith("//"):
        path, _, name = label[2:].partition(":")
        return f"//{path}:{name or path.rsplit('/', 1)[-1]}"
    return f"//{pkg}:{label.lstrip(':')}"


def label_to_path(label: str) -> str:
    path, _, name = label[2:].partition(":")
    return f"{path}/{name}" if path else name


def _glob(repo: Path, pkg: str, include, exclude=(), **_):
    base = repo / pkg
    out = []
    for pattern in include:
        for p in sorted(base.glob(pattern)):
            rel = p.relative_to(base).as_posix()
            if p.is_file() and not any(fnmatch.fnmatch(rel, x) for x in exclude):
                out.append(rel)
    return out


def _eval(node, env, where, glob):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_eval(e, env, where, glob) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {
            _eval(k, env, where, glob): _eval(v, env, where, glob)
            for k, v in zip(node.keys, node.values, strict=True)
        }
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _eval(node.left, env, where, glob) + _eval(node.right, env, where, glob)
    if isinstance(node, ast.Name) and node.id in env:
        return env[node.id]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "glob":
        args = [_eval(a, env, where, glob) for a in node.args]
        kwargs = {k.arg: _eval(k.value, env, where, glob) for k in node.keywords}
        return glob(*args, **kwargs)
    raise BuildError(f"{where}:{node.lineno}: unsupported BUILD construct {ast.unparse(node)!r}")


def _expand_pytest_test(kwargs: dict) -> tuple[str, dict]:
    """tests/pytest.bzl: pytest_test(name) is a py_test of `<name>.py`."""
    return "py_test", {**kwargs, "srcs": [kwargs["name"] + ".py"], "main": None}


MACROS = {"pytest_test": _expand_pytest_test}


def parse_build(repo: Path, build_file: str) -> list[Rule]:
    pkg = _package_of(build_file)
    tree = ast.parse((repo / build_file).read_text(), filename=build_file)
    env: dict = {"True": True, "False": False, "None": None}
    rules = []

    def glob(include, exclude=(), **kw):
        return _glob(repo, pkg, include, exclude, **kw)

    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and all(isinstance(t, ast.Name) for t in stmt.targets):
            value = _eval(stmt.value, env, build_file, glob)
            for t in stmt.targets:
                env[t.id] = value
            continue
        if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)):
            raise BuildError(f"{build_file}:{stmt.lineno}: unsupported statement")
        call = stmt.value
        func = call.func
        kind = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        if kind == "load" or kind is None:
            continue
        kwargs = {k.arg: _eval(k.value, env, build_file, glob) for k in call.keywords if k.arg}
        if "name" not in kwargs:
            continue  # package(), exports_files(), ...
        if kind in MACROS:
            kind, kwargs = MACROS[kind](kwargs)
        label = normalize_label(":" + kwargs["name"], pkg)
        srcs = [label_to_path(normalize_label(s, pkg)) for s in kwargs.get("srcs", [])]
        main = kwargs.get("main")
        if kind in ("py_binary", "py_test") and main is None and "srcs" in kwargs:
            main = kwargs["name"] + ".py" if kind == "py_binary" else None
        rules.append(
            Rule(
                kind=kind,
                label=label,
                build_file=build_file,
                srcs=srcs,
                deps=[normalize_label(d, pkg) for d in kwargs.get("deps", [])],
                tags=list(kwargs.get("tags", [])),
                tests=[normalize_label(t, pkg) for t in kwargs.get("tests", [])],
                main=label_to_path(normalize_label(main, pkg)) if main else None,
            )
        )
    return rules


def find_build_files(repo: Path) -> list[str]:
    found = [name for name in ("BUILD", "BUILD.bazel") if (repo / name).is_file()]
    for root in BUILD_ROOTS:
        for dirpath, dirnames, filenames in os.walk(repo / root):
            dirnames[:] = sorted(
                d for d in dirnames if not d.startswith((".", "bazel-")) and d != "__pycache__"
            )
            for name in ("BUILD", "BUILD.bazel"):
                if name in filenames:
                    found.append((Path(dirpath) / name).relative_to(repo).as_posix())
    return found


def load_rules(repo: Path) -> dict[str, Rule]:
    rules = {}
    for build_file in find_build_files(repo):
        for rule in parse_build(repo, build_file):
            rules[rule.label] = rule
    return rules


def python_files(repo: Path, root: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(repo / root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        out += [
            (Path(dirpath) / f).relative_to(repo).as_posix()
            for f in sorted(filenames)
            if f.endswith(".py")
        ]
    return out


# ---- imports -------------------------------------------------------------------------


def module_file(repo: Path, module: str) -> str | None:
    """'place_tf.data.schema' -> 'place_tf/data/schema.py' (or the package __init__)."""
    if module.split(".")[0] not in LIBRARY_ROOTS:
        return None
    base = module.replace(".", "/")
    for candidate in (f"{base}/__init__.py", f"{base}.py"):
        if (repo / candidate).is_file():
            return candidate
    return None


def package_chain(module: str) -> list[str]:
    """'a.b.c' -> ['a', 'a.b'] (the packages Python imports first)."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk_runtime(node):
    """ast.walk that skips `if TYPE_CHECKING:` bodies (imports for annotations only)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for sub in child.orelse:
                yield sub
                yield from _walk_runtime(sub)
            continue
        yield child
        yield from _walk_runtime(child)


def module_name(path: str) -> str:
    parts = path[: -len(".py")].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(repo: Path, path: str) -> list[tuple[str, int]]:
    """Project modules a file imports: (dotted name, line), resolved to real modules."""
    tree = ast.parse((repo / path).read_text(), filename=path)
    this = module_name(path)
    package = this if path.endswith("__init__.py") else this.rpartition(".")[0]
    found = []

    def add(name, line):
        if module_file(repo, name):
            found.append((name, line))
        elif name.split(".")[0] in LIBRARY_ROOTS:
            found.append((name + " (missing)", line))

    for node in _walk_runtime(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in LIBRARY_ROOTS:
                    add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] not in LIBRARY_ROOTS:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if module_file(repo, sub) else base, node.lineno)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and node.args[0].value.split(".")[0] in LIBRARY_ROOTS
        ):
            add(node.args[0].value, node.lineno)
    return found


# ---- checks --------------------------------------------------------------------------


def library_owners(rules: dict[str, Rule]) -> dict[str, list[str]]:
    owners: dict[str, list[str]] = {}
    for rule in rules.values():
        if rule.kind == "py_library":
            for src in rule.srcs:
                owners.setdefault(src, []).append(rule.label)
    return owners


def _package_build(repo: Path, path: str) -> str:
    """The BUILD file of the Bazel package a file belongs to (nearest one above it)."""
    directory = Path(path).parent
    while True:
        for name in ("BUILD", "BUILD.bazel"):
            if (repo / directory / name).is_file():
                return (directory / name).as_posix()
        if directory == Path("."):
            return "BUILD"
        directory = directory.parent


def _short(label: str, pkg: str) -> str:
    path, _, name = label[2:].partition(":")
    if path == pkg:
        return ":" + name
    return f"//{path}" if path.rsplit("/", 1)[-1] == name else label


def _deps_for(repo: Path, rules, owners, path: str, pkg: str) -> list[str]:
    """The deps a new target for `path` needs: the libraries owning what it imports, and
    its own package's __init__ target when no such dep brings it."""
    labels = set()
    for mod, _ in imported_modules(repo, path):
        labels.update(owners.get(module_file(repo, mod) or "", []))
    if path.split("/")[0] in LIBRARY_ROOTS:
        reachable = _closure(rules, labels)
        for package in package_chain(module_name(path)):
            for owner in owners.get(module_file(repo, package) or "", []):
                if owner not in reachable:
                    labels.add(owner)
    return sorted(_short(x, pkg) for x in labels)


def _suggest(repo: Path, rules: dict[str, Rule], owners, path: str, kind: str) -> str:
    """Where a forgotten module belongs: the library holding most of its directory, or a
    new target (with the deps its imports need) in its package's BUILD file."""
    directory = os.path.dirname(path)
    counts: dict[str, int] = {}
    for other, labels in owners.items():
        if os.path.dirname(other) == directory and other != path:
            counts[labels[0]] = counts.get(labels[0], 0) + 1
    best = max(sorted(counts), key=counts.get, default=None)
    if kind == "py_library" and best and counts[best] >= 2:
        return f"add it to srcs of {best} in {rules[best].build_file}"
    build = _package_build(repo, path)
    pkg = _package_of(build)
    rel = Path(path).relative_to(pkg).as_posix() if pkg else path
    deps = ", ".join(f'"{d}"' for d in _deps_for(repo, rules, owners, path, pkg))
    name = Path(path).stem
    return f'add {kind}(name = "{name}", srcs = ["{rel}"], deps = [{deps}]) to {build}'


def check_module_coverage(repo: Path, rules: dict[str, Rule]) -> list[str]:
    owners = library_owners(rules)
    problems = []
    for root in LIBRARY_ROOTS:
        for path in python_files(repo, root):
            labels = owners.get(path, [])
            if not labels:
                problems.append(
                    f"{path} is in no py_library: "
                    + _suggest(repo, rules, owners, path, "py_library")
                )
            elif len(labels) > 1:
                problems.append(f"{path} is in {len(labels)} py_libraries: {', '.join(labels)}")
    for rule in rules.values():
        if rule.kind in PY_RULES:
            for src in rule.srcs:
                if not (repo / src).is_file():
                    problems.append(
                        f"{rule.label} ({rule.build_file}): srcs has {src}: no such file"
                    )
    return problems


def check_tool_binaries(repo: Path, rules: dict[str, Rule]) -> list[str]:
    owners = library_owners(rules)
    problems = []
    for path in sorted(p.relative_to(repo).as_posix() for p in (repo / "tools").glob("*.py")):
        mains = [r.label for r in rules.values() if r.kind == "py_binary" and r.main == path]
        if len(mains) != 1:
            problems.append(
                f"{path} must be the main of exactly one py_binary (found: "
                f"{', '.join(mains) or 'none'}): "
                + _suggest(repo, rules, owners, path, "py_binary")
            )
    return problems


def _closure(rules: dict[str, Rule], labels) -> set[str]:
    seen, todo = set(), list(labels)
    while todo:
        label = todo.pop()
        if label in seen:
            continue
        seen.add(label)
        if label in rules:
            todo += rules[label].deps
    return seen


def check_deps(repo: Path, rules: dict[str, Rule]) -> list[str]:
    owners = library_owners(rules)
    problems = []
    for rule in sorted(rules.values(), key=lambda r: r.label):
        if rule.kind not in PY_RULES:
            continue
        where = f"{rule.label} ({rule.build_file})"
        for dep in rule.deps:
            if dep.startswith("@"):
                continue
            if dep not in rules:
                problems.append(f"{where}: dep {dep} does not exist")
            elif rules[dep].kind != "py_library":
                problems.append(f"{where}: dep {dep} is a {rules[dep].kind}, not a py_library")
        if rule.kind == "py_library" and not rule.srcs:
            continue  # an umbrella target (//place_tf): any libraries it likes

        required: dict[str, str] = {}  # label -> why
        implicit: dict[str, str] = {}
        for src in rule.srcs:
            if not src.endswith(".py") or not (repo / src).is_file():
                continue
            src_owners = owners.get(src, [])
            if rule.kind != "py_library" and src_owners:
                # A binary over a library's module: the library carries the imports.
                required.setdefault(src_owners[0], f"{src} is in that library")
                continue
            for pkg in package_chain(module_name(src)):
                for owner in owners.get(module_file(repo, pkg), []):
                    implicit.setdefault(owner, f"{src} is in package {pkg}")
            for mod, line in imported_modules(repo, src):
                if mod.endswith(" (missing)"):
                    problems.append(f"{where}: {src}:{line} imports {mod[:-10]}: no such module")
                    continue
                for owner in owners.get(module_file(repo, mod), []):
                    required.setdefault(owner, f"{src}:{line} imports {mod}")
                for pkg in package_chain(mod):
                    for owner in owners.get(module_file(repo, pkg), []):
                        implicit.setdefault(owner, f"{src}:{line} imports {mod} (package {pkg})")
        required.pop(rule.label, None)
        implicit.pop(rule.label, None)
        for label, why in sorted(required.items()):
            if label not in rule.deps:
                problems.append(f"{where}: missing dep {label}: {why}")
        reachable = _closure(rules, rule.deps)
        for label, why in sorted(implicit.items()):
            if label not in reachable and label not in required:
                problems.append(f"{where}: missing dep {label} (directly or through a dep): {why}")
        for dep in rule.deps:
            if dep in rules and dep not in required and dep not in implicit:
                problems.append(f"{where}: dep {dep} is not imported by its sources: remove it")
    return problems


def check_cycles(rules: dict[str, Rule]) -> list[str]:
    """Bazel refuses cyclic deps; modules that import each other must share a target."""
    problems, state = [], {}

    def visit(label, stack):
        state[label] = "open"
        for dep in rules[label].deps:
            if dep not in rules:
                continue
            if state.get(dep) == "open":
                cycle = stack[stack.index(dep) :] + [dep]
                problems.append(
                    "dependency cycle "
                    + " -> ".join(cycle)
                    + ": put the modules that import each other into one py_library"
                )
            elif dep not in state:
                visit(dep, stack + [dep])
        state[label] = "done"

    for label in sorted(rules):
        if label not in state:
            visit(label, [label])
    return problems


def check_fast_suite(rules: dict[str, Rule]) -> list[str]:
    suite = rules.get("//tests:fast")
    if suite is None:
        return ["//tests:fast (tests/BUILD) is missing"]
    problems = []
    for label in suite.tests:
        if label not in rules or rules[label].kind != "py_test":
            problems.append(f"//tests:fast lists {label}, which is not a py_test")
    for rule in rules.values():
        if rule.kind == "py_test" and not {"slow", "manual"} & set(rule.tags):
            if rule.label not in suite.tests:
                problems.append(
                    f"{rule.label} ({rule.build_file}) is not in //tests:fast: add it to "
                    f'tests/BUILD, or tag it "slow"'
                )
    return problems


def _report(problems: list[str]) -> str:
    return f"{len(problems)} Bazel BUILD problem(s):\n  " + "\n  ".join(problems)


# ---- the repository ------------------------------------------------------------------


@pytest.fixture(scope="module")
def rules():
    return load_rules(REPO)


def test_every_module_is_in_exactly_one_py_library(rules):
    problems = check_module_coverage(REPO, rules)
    assert not problems, _report(problems)
    covered = library_owners(rules)
    assert "place_tf/config.py" in covered and "place_tf/data/schema.py" in covered


def test_every_tool_script_has_a_py_binary(rules):
    problems = check_tool_binaries(REPO, rules)
    assert not problems, _report(problems)


def test_deps_are_exactly_the_imported_targets(rules):
    problems = check_deps(REPO, rules) + check_cycles(rules)
    assert not problems, _report(problems)


def test_fast_suite_lists_every_fast_test(rules):
    problems = check_fast_suite(rules)
    assert not problems, _report(problems)
    assert len(rules["//tests:fast"].tests) >= 5


# ---- the checks themselves, on a small made-up repository ------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))


GOOD = {
    "place_tf/__init__.py": "",
    "place_tf/BUILD": """
        py_library(name = "init", srcs = ["__init__.py"])
    """,
    "place_tf/a/__init__.py": "",
    "place_tf/a/x.py": "import numpy\n",
    "place_tf/a/y.py": """
        from typing import TYPE_CHECKING
        from . import x
        if TYPE_CHECKING:
            from place_tf.b import z
        def lazy():
            from place_tf.b.z import thing
    """,
    "place_tf/a/BUILD": """
        SRCS = ["__init__.py", "x.py"]
        py_library(name = "a", srcs = SRCS + ["y.py"], deps = ["//place_tf/b", "//place_tf:init"])
    """,
    "place_tf/b/__init__.py": "",
    "place_tf/b/z.py": "thing = 1\n",
    "place_tf/b/BUILD": """
        py_library(name = "b", srcs = glob(["*.py"]), deps = ["//place_tf:init"])
    """,
    "tests/BUILD": 'test_suite(name = "fast", tests = ["//tests/a:test_y"])\n',
    "tests/a/test_y.py": "from place_tf.a.y import lazy\n",
    "tests/a/BUILD": """
        load("//tests:pytest.bzl", "pytest_test")
        pytest_test(name = "test_y", deps = ["//place_tf/a"])
    """,
    "tools/run.py": "from place_tf.b import z\n",
    "tools/BUILD": 'py_binary(name = "run", srcs = ["run.py"], deps = ["//place_tf/b"])\n',
}


def _problems(root: Path) -> list[str]:
    rules = load_rules(root)
    return (
        check_module_coverage(root, rules)
        + check_tool_binaries(root, rules)
        + check_deps(root, rules)
        + check_cycles(rules)
        + check_fast_suite(rules)
    )


def test_checks_accept_a_consistent_tree(tmp_path):
    _write(tmp_path, GOOD)
    assert _problems(tmp_path) == []
    rules = load_rules(tmp_path)
    assert rules["//place_tf/b:b"].srcs == ["place_tf/b/__init__.py", "place_tf/b/z.py"]
    assert rules["//tests/a:test_y"].srcs == ["tests/a/test_y.py"]


def test_a_forgotten_module_names_file_and_target(tmp_path):
    _write(tmp_path, {**GOOD, "place_tf/a/new.py": "x = 1\n"})
    assert _problems(tmp_path) == [
        "place_tf/a/new.py is in no py_library: add it to srcs of //place_tf/a:a in "
        "place_tf/a/BUILD"
    ]


def test_a_module_in_two_libraries_is_reported(tmp_path):
    build = 'py_library(name = "init", srcs = ["__init__.py"])\n'
    build += 'py_library(name = "also", srcs = ["__init__.py"])\n'
    _write(tmp_path, {**GOOD, "place_tf/BUILD": build})
    problems = _problems(tmp_path)
    assert "place_tf/__init__.py is in 2 py_libraries: //place_tf:init, //place_tf:also" in problems


def test_a_lazy_import_without_its_dep_is_missing(tmp_path):
    build = 'py_library(name = "a", srcs = ["__init__.py", "x.py", "y.py"], deps = ["//place_tf:init"])\n'
    _write(tmp_path, {**GOOD, "place_tf/a/BUILD": build})
    assert _problems(tmp_path) == [
        "//place_tf/a:a (place_tf/a/BUILD): missing dep //place_tf/b:b: "
        "place_tf/a/y.py:7 imports place_tf.b.z"
    ]


def test_an_unused_dep_and_an_unreachable_package_are_reported(tmp_path):
    files = dict(GOOD)
    files["place_tf/b/BUILD"] = 'py_library(name = "b", srcs = glob(["*.py"]))\n'
    files["tools/BUILD"] = (
        'py_binary(name = "run", srcs = ["run.py"], deps = ["//place_tf/b", "//place_tf/a"])\n'
    )
    _write(tmp_path, files)
    problems = _problems(tmp_path)
    assert (
        "//tools:run (tools/BUILD): dep //place_tf/a:a is not imported by its sources: remove it"
        in problems
    )
    assert any(
        p.startswith("//place_tf/b:b (place_tf/b/BUILD): missing dep //place_tf:init")
        for p in problems
    ), problems


def test_a_dependency_cycle_is_reported(tmp_path):
    # place_tf/b now imports place_tf.a, which imports place_tf.b lazily.
    files = {**GOOD, "place_tf/b/z.py": "import place_tf.a.x\nthing = 1\n"}
    files["place_tf/b/BUILD"] = (
        'py_library(name = "b", srcs = glob(["*.py"]), deps = ["//place_tf/a", "//place_tf:init"])\n'
    )
    _write(tmp_path, files)
    assert _problems(tmp_path) == [
        "dependency cycle //place_tf/a:a -> //place_tf/b:b -> //place_tf/a:a: put the modules "
        "that import each other into one py_library"
    ]


def test_tools_and_fast_suite_gaps_are_reported(tmp_path):
    files = {**GOOD, "tools/other.py": "print(1)\n", "tests/BUILD": 'test_suite(name = "fast")\n'}
    _write(tmp_path, files)
    problems = _problems(tmp_path)
    assert any(
        p.startswith("tools/other.py must be the main of exactly one py_binary") for p in problems
    )
    assert (
        '//tests/a:test_y (tests/a/BUILD) is not in //tests:fast: add it to tests/BUILD, or tag it "slow"'
        in problems
    )


def test_unsupported_build_syntax_is_a_clear_error(tmp_path):
    _write(tmp_path, {**GOOD, "place_tf/b/BUILD": 'py_library(name = "b", srcs = select({}))\n'})
    with pytest.raises(BuildError, match=r"place_tf/b/BUILD:1: unsupported BUILD construct"):
        load_rules(tmp_path)


# ---- Bazel itself --------------------------------------------------------------------


@pytest.mark.slow
def test_make_bazel_test_passes():
    """`make bazel-test` (we already run inside the environment): build //..., test //tests:fast.

    Installs bazel-bootstrap with apt on first use, like `make bazel-test` (CI runs as root).
    """
    if not shutil.which("bazel") and os.geteuid() != 0:
        pytest.skip("bazel is not installed and installing bazel-bootstrap needs root")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        ["bash", str(REPO / "tools" / "bazel_test.sh")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    n = len(load_rules(REPO)["//tests:fast"].tests)
    assert re.search(rf"Executed \d+ out of {n} tests?: {n} tests? pass", out), out[-3000:]
