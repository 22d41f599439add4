"""place-tf as a Python package: what place_tf imports is declared in pyproject.toml, the
locks pin one version per package across environments, a wheel built by `python -m build`
installs into a fresh venv and trains, and training runs as a non-root user."""

import ast
import importlib.metadata
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile

import pytest

from place_tf.config import TINY_MODEL_FIELDS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCKS = os.path.join(REPO, "requirements")
NOBODY = 65534


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(extras: tuple[str, ...] = ()) -> set[str]:
    """Canonical names of pyproject's dependencies plus those of `extras`."""
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = list(project["dependencies"])
    for e in extras:
        reqs += project["optional-dependencies"][e]
    return {canonical(re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0]) for r in reqs}


def third_party_imports(root: str, own: str = "place_tf") -> dict[str, list[str]]:
    """{top-level module: ["file:line", ...]} of every absolute import under `root` (lazy
    imports inside functions too) that is neither the standard library nor `own`."""
    found: dict[str, list[str]] = {}
    for dirpath, _, files in os.walk(root):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods = [node.module]
                else:
                    continue
                for m in mods:
                    top = m.split(".")[0]
                    if top != own and top not in sys.stdlib_module_names:
                        found.setdefault(top, []).append(f"{path}:{node.lineno}")
    return found


def undeclared(imports: dict[str, list[str]], names: set[str]) -> list[str]:
    """One message per imported module whose distribution is not among `names`."""
    providers = importlib.metadata.packages_distributions()
    problems = []
    for mod, where in sorted(imports.items()):
        dists = {canonical(d) for d in providers.get(mod, [])}
        if not dists:
            problems.append(f"{mod} (imported at {where[0]}) is provided by no installed package")
        elif not dists & names:
            problems.append(
                f"{mod} (imported at {where[0]}) comes from {sorted(dists)}, "
                "which pyproject.toml does not declare"
            )
    return problems


def test_place_tf_imports_only_declared_packages():
    # The wheel's dependencies (no extras): what `pip install place-tf` brings.
    assert undeclared(third_party_imports(os.path.join(REPO, "place_tf")), declared()) == []


def test_an_undeclared_import_is_reported(tmp_path):
    # yaml and matplotlib are installed (dev extra) but not core dependencies; numpy is.
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("import numpy as np\n\n\ndef f():\n    import yaml\n")
    (pkg / "b.py").write_text("from matplotlib import pyplot\nfrom . import a\n")
    found = third_party_imports(str(pkg))
    assert sorted(found) == ["matplotlib", "numpy", "yaml"]
    assert found["yaml"] == [f"{pkg / 'a.py'}:5"]
    problems = undeclared(found, declared())
    assert len(problems) == 2
    assert problems[0].startswith(f"matplotlib (imported at {pkg / 'b.py'}:1) comes from")
    assert problems[1].startswith(f"yaml (imported at {pkg / 'a.py'}:5) comes from ['pyyaml']")
    assert undeclared(found, declared(("dev",))) == []


def read_lock(name: str) -> dict[str, set[str]]:
    """{package: {versions}} of a lock; asserts every pin carries a hash."""
    pins: dict[str, set[str]] = {}
    with open(os.path.join(LOCKS, name)) as f:
        text = f.read()
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        m = re.match(r"([A-Za-z0-9._-]+)==([^\s;\\]+)", block)
        if not m:
            continue
        assert "--hash=sha256:" in block, f"{name}: {m.group(0)} has no hash"
        pins.setdefault(canonical(m.group(1)), set()).add(m.group(2))
    return pins


def test_locks_pin_one_version_per_package_and_cover_the_declarations():
    tfx = read_lock("tfx.lock")
    for name, extras in (
        ("core.lock", ("dev",)),
        ("gpu.lock", ("gpu", "dev")),
        ("tfx-gpu.lock", ("tfx", "gpu", "dev")),
    ):
        lock = read_lock(name)
        assert declared(extras) <= set(lock), (name, declared(extras) - set(lock))
        # The same version wherever both pin a package (tfx.lock constrains the others).
        differ = {p: (v, tfx[p]) for p, v in lock.items() if p in tfx and not v <= tfx[p]}
        assert differ == {}, name
    assert declared(("tfx", "dev")) <= set(tfx)
    # The gpu locks add exactly TensorFlow's CUDA wheels.
    gpu, core = read_lock("gpu.lock"), read_lock("core.lock")
    extra = set(gpu) - set(core)
    assert extra and all(p.startswith("nvidia-") for p in extra), extra
    assert gpu["tensorflow"] == core["tensorflow"] == tfx["tensorflow"]


def test_component_image_matches_the_locks():
    """The Dockerfile installs an existing lock (CPU and GPU variants) and copies the Beam
    SDK boot entrypoint (Dataflow custom containers) of the locked apache-beam version."""
    with open(os.path.join(REPO, "pipelines", "Dockerfile")) as f:
        docker = f.read()
    (beam,) = read_lock("tfx.lock")["apache-beam"]
    assert f"ARG BEAM_VERSION={beam}\n" in docker
    assert "FROM apache/beam_python3.13_sdk:${BEAM_VERSION} AS beam" in docker
    assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in docker
    (default_lock,) = re.findall(r"^ARG LOCK=(\S+)$", docker, re.M)
    for lock in (default_lock, *re.findall(r"--build-arg LOCK=(\S+)", docker)):
        assert os.path.isfile(os.path.join(LOCKS, lock)), lock
    assert "tfx-gpu.lock" in docker


def _tiny_training_flags(corpus: str, model_dir: str, steps: int) -> list[str]:
    return [
        *(f"--{k}={v}" for k, v in TINY_MODEL_FIELDS.items()),
        "--per_replica_batch=8",
        f"--corpus_dir={corpus}",
        "--synthetic_images=64",
        f"--model_dir={model_dir}",
        f"--max_steps={steps}",
        "--noprobe",
        "--nojit_compile",
    ]


def _clean_env(**extra: str) -> dict:
    """The caller's environment without this checkout on the path or pip's local config."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_FIND_LINKS")}
    env.update(PIP_CONFIG_FILE=os.devnull, TF_CPP_MIN_LOG_LEVEL="2", **extra)
    return env


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.slow
def test_built_wheel_installs_into_a_fresh_venv_and_trains(tmp_path):
    # Build from a copy of the sources: nothing is written into the checkout, and no stale
    # build/ directory can leak old files into the wheel.
    src = tmp_path / "src"
    shutil.copytree(
        os.path.join(REPO, "place_tf"),
        src / "place_tf",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, f), src / f)
    dist = tmp_path / "dist"
    _run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(dist),
            str(src),
        ]
    )
    (wheel,) = dist.glob("place_tf-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "place_tf/train.py" in names and "place_tf/data/synthetic.py" in names
    assert not [n for n in names if n.startswith(("tests/", "pipelines/", "tools/"))]
    assert "Requires-Dist: tensorflow==2.21.*" in meta
    assert 'Requires-Dist: tensorflow[and-cuda]==2.21.*; extra == "gpu"' in meta

    # A fresh venv. Its dependencies are not downloaded again (2 GB): a .pth makes this
    # environment's packages visible, and pip installs the wheel with --no-index, so it
    # must find every declared dependency among them or fail.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    fresh_site = _run([py, "-c", "import site; print(site.getsitepackages()[0])"]).stdout.strip()
    ours = _run(
        [sys.executable, "-c", "import site; print(*site.getsitepackages(), sep='\\n')"]
    ).stdout.split()
    with open(os.path.join(fresh_site, "zz_deps.pth"), "w") as f:
        f.write("\n".join(ours) + "\n")
    env = _clean_env()
    _run([py, "-m", "pip", "install", "--no-index", "--quiet", str(wheel)], env=env, cwd=tmp_path)
    where = _run([py, "-c", "import place_tf; print(place_tf.__file__)"], env=env, cwd=tmp_path)
    assert where.stdout.strip().startswith(fresh_site), where.stdout

    # absl's --helpfull prints the usage and exits 1; the flags are listed under the module
    # that defined them, here the wheel's copy.
    helpfull = subprocess.run(
        [py, "-m", "place_tf.train", "--helpfull"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert "PLACE pre-training" in helpfull.stdout, helpfull.stderr[-3000:]
    assert f"{fresh_site}/place_tf/train.py:" in helpfull.stdout
    assert "--max_steps: [train] max_steps" in helpfull.stdout
    flags = _tiny_training_flags(str(tmp_path / "corpus"), str(tmp_path / "run"), 5)
    _run([py, "-m", "place_tf.train", *flags], env=env, cwd=tmp_path, timeout=900)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 5
    assert os.path.isfile(os.path.join(summary["export"], "saved_model.pb"))


def _place_env_kind() -> str:
    path = os.path.join(REPO, ".place-env")
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        kinds = [ln.split("=", 1)[1].strip() for ln in f if ln.startswith("PLACE_ENV=")]
    return kinds[0] if kinds else ""


@pytest.mark.slow
@pytest.mark.skipif(
    sys.prefix.startswith("/opt/place-tf/"), reason="inside the root filesystem (root only)"
)
def test_training_runs_as_a_non_root_user(request):
    """The main job needs no root: a short training in this venv as an unprivileged user.

    Run as root (CI), the test drops to `nobody`. CI clones as root into a folder whose
    parents (and the interpreter the venv points at, e.g. pyenv under /root) need not be
    readable by others, so `nobody` keeps exactly one privilege: CAP_DAC_READ_SEARCH, to
    read and traverse files as the owner of a checkout can - no write access to anything
    it does not own, no chroot, no mounts, uid and gid not 0. Its HOME and outputs are in a
    directory it owns, directly under /tmp: TensorFlow checks paths with access(2), which
    ignores capabilities, so the data must not sit under a private directory such as
    pytest's. Copying the venv (2 GB) or bind-mounting paths would also work, but each
    would test another layout than the one `make setup` built.
    """
    work = pathlib.Path(tempfile.mkdtemp(prefix="place-tf-nonroot-"))
    request.addfinalizer(lambda: shutil.rmtree(work, ignore_errors=True))
    os.chmod(work, 0o755)
    prefix = []
    if os.geteuid() == 0:
        os.chown(work, NOBODY, NOBODY)
        prefix = [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            "--inh-caps=+dac_read_search",
            "--ambient-caps=+dac_read_search",
        ]
    env = _clean_env(HOME=str(work), PYTHONPATH=REPO)
    ids = _run(
        [*prefix, sys.executable, "-c", "import os; print(os.geteuid(), os.getegid())"], env=env
    )
    assert "0" not in ids.stdout.split(), ids.stdout
    flags = _tiny_training_flags(str(work / "corpus"), str(work / "run"), 5)
    _run(
        [*prefix, sys.executable, "-m", "place_tf.train", *flags, "--noexport"],
        env=env,
        cwd=work,
        timeout=900,
    )
    summary_path = work / "run" / "summary.json"
    assert json.loads(summary_path.read_text())["steps"] == 5
    if prefix:
        assert os.stat(summary_path).st_uid == NOBODY
