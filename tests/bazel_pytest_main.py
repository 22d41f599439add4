"""Main of every Bazel py_test made by tests/pytest.bzl: run one test file under pytest.

    bazel test //tests/losses:test_losses_numpy   (args: <test file> [pytest args...])

Bazel's stub puts only the runfiles tree on sys.path, so the test imports exactly the
project modules its deps bring in. This wrapper also fails the test when the source
checkout is on sys.path or a project module was imported from it (e.g. through a leaked
PYTHONPATH): either would hide a missing dep.
"""

from __future__ import annotations

import os
import sys

PROJECT_PACKAGES = ("place_tf", "pipelines")


def _leaks(workspace: str, source_root: str) -> list[str]:
    """Project modules imported from outside the runfiles workspace."""
    bad = []
    for name, module in sorted(sys.modules.items()):
        if name.split(".")[0] not in PROJECT_PACKAGES:
            continue
        path = getattr(module, "__file__", None)
        if path and not os.path.abspath(path).startswith(workspace + os.sep):
            bad.append(f"{name} from {path}")
    return bad


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: bazel_pytest_main.py TEST_FILE [PYTEST_ARGS...]", file=sys.stderr)
        return 2
    here = os.path.abspath(__file__)  # <runfiles>/<workspace>/tests/bazel_pytest_main.py
    workspace = os.path.dirname(os.path.dirname(here))
    source_root = os.path.dirname(os.path.dirname(os.path.realpath(here)))
    if os.path.realpath(workspace) == source_root:
        print(f"{here} is meant to run from Bazel's runfiles, not the checkout", file=sys.stderr)
        return 2
    # Python puts the script's symlink-resolved directory (tests/ in the checkout) first on
    # sys.path; use the runfiles copy instead so nothing is imported from the checkout.
    if sys.path and sys.path[0] == os.path.dirname(os.path.realpath(here)):
        sys.path[0] = os.path.dirname(here)
    on_path = [p for p in sys.path if p and os.path.realpath(p) == source_root]
    if on_path:
        print(f"the source checkout {source_root} is on sys.path (PYTHONPATH?): {on_path}")
        return 3

    test_file = os.path.abspath(argv[0])
    args = [test_file, "-c", os.path.join(workspace, "pyproject.toml"), "--rootdir", workspace]
    args += ["-p", "no:cacheprovider"]  # nothing written into the runfiles tree
    tmp = os.environ.get("TEST_TMPDIR")
    if tmp:
        args += ["--basetemp", os.path.join(tmp, "pytest")]
        os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tmp, "hypothesis"))
    xml = os.environ.get("XML_OUTPUT_FILE")
    if xml:
        args += ["--junitxml", xml]

    import pytest

    code = int(pytest.main(args + argv[1:]))
    leaks = _leaks(workspace, source_root)
    if leaks:
        print("project modules were imported from outside the runfiles (missing deps?):")
        print("\n".join("  " + x for x in leaks))
        return code or 3
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
