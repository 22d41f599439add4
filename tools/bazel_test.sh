#!/usr/bin/env bash
# `make bazel-test`: build every Bazel target and run the fast unit tests (//tests:fast)
# with Bazel 4.2 (Debian's bazel-bootstrap), inside the project environment (tools/run).
#
#   tools/run bash tools/bazel_test.sh                 # build //..., test //tests:fast
#   tools/run bash tools/bazel_test.sh //tests/losses:all --test_output=all
#
# - Installs bazel-bootstrap with apt when no `bazel` is on PATH (root only; once).
# - The Python toolchain is the environment's interpreter (PLACE_TF_PYTHON, see
#   tools/python_env.bzl); third-party packages come from its site-packages.
# - PYTHONPATH is cleared: tools/run points it at the checkout, and the tests must import
#   project modules only from their runfiles, or a missing dep would go unnoticed.
# - Bazel's output base lives outside the repo: $PLACE_TF_BAZEL_ROOT, default
#   ${XDG_CACHE_HOME:-$HOME/.cache}/place-tf/bazel (inside the rootfs for that kind).
# - PLACE_TF_BAZEL_STRATEGY=local|sandboxed|processwrapper-sandbox overrides Bazel's choice
#   of spawn strategy (default: the best sandbox that works here).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
die() { echo "bazel-test: error: $*" >&2; exit 1; }
log() { echo "bazel-test: $*" >&2; }

ROOT="${PLACE_TF_BAZEL_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/place-tf/bazel}"
mkdir -p "$ROOT"

ensure_bazel() {
  if command -v bazel >/dev/null 2>&1; then
    return
  fi
  command -v apt-get >/dev/null 2>&1 \
    || die "bazel is not installed and there is no apt-get: install Bazel 4.2 (Debian package bazel-bootstrap)"
  [ "$(id -u)" = 0 ] \
    || die "bazel is not installed; installing bazel-bootstrap with apt needs root (sudo apt-get install bazel-bootstrap)"
  local aptlog="$ROOT/apt-install.log"
  log "installing bazel-bootstrap (Bazel 4.2 and a JDK) with apt, once; about 2 minutes"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q --no-install-recommends bazel-bootstrap >"$aptlog" 2>&1; then
    # Stale package lists are the usual cause: refresh them once and retry.
    log "apt-get install failed; running apt-get update and retrying"
    apt-get update -q >>"$aptlog" 2>&1 \
      || { tail -n 5 "$aptlog" >&2; die "apt-get update failed (network? log: $aptlog)"; }
    apt-get install -y -q --no-install-recommends bazel-bootstrap >>"$aptlog" 2>&1 \
      || { tail -n 5 "$aptlog" >&2; die "apt-get install bazel-bootstrap failed (log: $aptlog)"; }
  fi
  command -v bazel >/dev/null 2>&1 || die "bazel-bootstrap is installed but 'bazel' is not on PATH"
}

ensure_bazel

# The environment's interpreter (tools/run puts the venv first on PATH).
PLACE_TF_PYTHON="${PLACE_TF_PYTHON:-$(command -v python3 || true)}"
[ -n "$PLACE_TF_PYTHON" ] || die "no python3 on PATH: run this through tools/run (make bazel-test)"
PLACE_TF_PYTHON="$(PYTHONPATH='' "$PLACE_TF_PYTHON" -c 'import sys; print(sys.executable)')"
PYTHONPATH='' "$PLACE_TF_PYTHON" -c 'import pytest' 2>/dev/null \
  || die "$PLACE_TF_PYTHON cannot import pytest: not the project environment? (run 'make setup')"
export PLACE_TF_PYTHON
unset PYTHONPATH

# Inside the rootfs kind every tools/run call is a new mount namespace, and a Bazel client
# restarts a server whose working directory it cannot see ("server's cwd moved"): the
# server cannot outlive this script usefully, so it is shut down at the end.
chrooted=0
init_root="$(stat -c %d:%i /proc/1/root/. 2>/dev/null || true)"  # readable by root only
if [ -n "$init_root" ] && [ "$init_root" != "$(stat -c %d:%i /)" ]; then
  chrooted=1
fi
startup=(--output_user_root="$ROOT" --max_idle_secs=1800)
bz() { bazel "${startup[@]}" "$@"; }
if [ "$chrooted" = 1 ]; then
  trap 'bz shutdown >/dev/null 2>&1 || true' EXIT
fi

# Spawn strategy: Bazel's default picks the linux sandbox (namespaces) where it works and
# otherwise the processwrapper sandbox (a private symlink tree of the declared inputs, no
# namespaces), which is what runs in containers that refuse clone(CLONE_NEWUSER). Either
# way a test sees only its runfiles on sys.path. PLACE_TF_BAZEL_STRATEGY overrides it
# (e.g. local, to debug a test in place).
flags=()
[ -n "${PLACE_TF_BAZEL_STRATEGY:-}" ] && flags+=(--spawn_strategy="$PLACE_TF_BAZEL_STRATEGY")

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(//tests:fast)

log "bazel build //... (Python $PLACE_TF_PYTHON, output root $ROOT)"
bz build ${flags[@]+"${flags[@]}"} -- //...
log "bazel test ${targets[*]}"
bz test ${flags[@]+"${flags[@]}"} "${targets[@]}"
