"""pytest_test: a py_test that runs one pytest file from Bazel's runfiles."""

def pytest_test(name, deps = [], data = [], args = [], markers = "not slow", size = "medium", **kwargs):
    """A py_test named after its file (`<name>.py`), run by pytest through bazel_pytest_main.

    Args:
      name: the test file's stem; the file is `<name>.py` in this package.
      deps: the py_library targets the test file imports (and nothing else).
      data: extra runfiles.
      args: extra pytest arguments.
      markers: pytest `-m` expression; "not slow" like `make test-fast`, "" for all.
      size: Bazel test size (medium: 5 min timeout; TensorFlow takes seconds to import).
      **kwargs: passed to py_test (tags, shard_count, ...).
    """
    src = name + ".py"
    native.py_test(
        name = name,
        srcs = [src, "//tests:bazel_pytest_main.py"],
        main = "//tests:bazel_pytest_main.py",
        args = ["$(rootpath %s)" % src] + (["-m", "'%s'" % markers] if markers else []) + args,
        data = ["//:pyproject.toml", "//tests:conftest.py"] + data,
        deps = deps,
        python_version = "PY3",
        srcs_version = "PY3",
        size = size,
        **kwargs
    )
