#!/usr/bin/env bash
# One set-up command for PLACE-TF (called by `make setup`).
#
#   tools/setup_env.sh        the environment for this host (below)
#   tools/setup_env.sh tfx    also build the TFX environment now (tools/run builds it on
#                             the first TFX command otherwise)
#
# Environment kinds (PLACE_ENV; auto picks venv or split):
#   venv   - host glibc >= 2.39: one plain .venv in the repo with everything, TFX too
#            (requirements/tfx.lock). No root.
#   split  - older hosts (Debian 12, Ubuntu 22.04, RHEL 8/9; glibc >= 2.27): a plain .venv
#            with the main job - convert, train, evaluate, export, serve-check, tests -
#            (requirements/core.lock), no root. Only TFX 1.21's ml-metadata and
#            tensorflow-data-validation need glibc 2.39 (manylinux_2_39 wheels), so TFX
#            commands and tests run in a Debian 13 root filesystem with
#            requirements/tfx.lock, built (as root) only when one first needs it.
#   rootfs - everything in the Debian 13 root filesystem (the pre-split layout; forced
#            with PLACE_ENV=rootfs, e.g. to test that path).
# GPU=1 installs TensorFlow's CUDA wheels into the .venv (gpu.lock / tfx-gpu.lock);
# unset, they are installed when `nvidia-smi -L` lists a GPU; GPU=0 never.
# PYTHON picks the interpreter for the .venv (default python3; 3.11 to 3.13).
#
# The root filesystem is cached outside the repo (PLACE_TF_CACHE, default
# ~/.cache/place-tf), its venv keyed by the lock hash. Every cached piece is built under
# its final name and marked complete by a stamp written last, so a half-built piece
# (killed setup, full disk) is never used: it is removed and rebuilt on the next run.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCKS="$REPO/requirements"
CACHE="${PLACE_TF_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/place-tf}"
SUITE=trixie
ENV_FILE="$REPO/.place-env"
PY="${PYTHON:-python3}"

die() { echo "setup: error: $*" >&2; exit 1; }
log() { echo "setup: $*" >&2; }

lock_hash() { sha256sum "$1" | cut -c1-16; }

glibc_version() { getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}'; }

glibc_at_least() {  # $1 = major.minor
  local v
  v="$(glibc_version)" || return 1
  [ -n "$v" ] || return 1
  [ "$(printf '%s\n%s\n' "$1" "$v" | sort -V | head -1)" = "$1" ]
}

want_gpu() {
  case "${GPU:-}" in
    1|yes|true) return 0 ;;
    0|no|false) return 1 ;;
    "") command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU ' ;;
    *) die "GPU must be 1 or 0 (got '$GPU')" ;;
  esac
}

check_disk() {  # $1 = directory, $2 = MiB needed
  mkdir -p "$1"
  local avail
  avail="$(df -Pm "$1" | awk 'NR==2{print $4}')"
  if [ "${avail:-0}" -lt "$2" ]; then
    die "not enough disk space in $1: ${avail} MiB free, about $2 MiB needed (free space or set PLACE_TF_CACHE to another disk)"
  fi
}

check_registry() {
  # Fail early and clearly when the package registry cannot be reached.
  local url="${PIP_INDEX_URL:-https://pypi.org/simple/}"
  if ! "$PY" - "$url" <<'PYEOF'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1] + "pip/", timeout=20)
except Exception as e:  # noqa: BLE001
    print(f"{type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1)
PYEOF
  then
    die "cannot reach the package registry at $url (no network, or set PIP_INDEX_URL to a mirror)"
  fi
}

check_python() {
  command -v "$PY" >/dev/null || die "no '$PY' on PATH: install Python 3.11-3.13 or set PYTHON=/path/to/python3"
  "$PY" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] <= (3, 13) else 1)' \
    || die "$PY is Python $("$PY" -c 'import sys; print(*sys.version_info[:3], sep=".")'); TensorFlow 2.21 and this project need 3.11-3.13 (set PYTHON=...)"
  "$PY" -c 'import ensurepip, venv' 2>/dev/null \
    || die "$PY cannot create venvs (Debian/Ubuntu: apt install python3-venv; or set PYTHON=...)"
}

pip_install() {  # $1 = python of the venv, $2 = lock file
  "$1" -m pip install --quiet --disable-pip-version-check --no-input --no-deps \
    --require-hashes -r "$2"
}

setup_host_venv() {  # $1 = lock file: the repo's .venv, built in place, no root
  local lock="$1" venv="$REPO/.venv" stamp
  stamp=".place-tf-$(basename "$lock" .lock)-$(lock_hash "$lock")"
  if [ -f "$venv/.place-tf-complete" ] && [ -f "$venv/$stamp" ]; then
    log "venv is up to date ($venv, $(basename "$lock"))"
    return
  fi
  check_python
  check_disk "$REPO" 6000
  check_registry
  rm -rf "$venv"
  log "creating $venv from requirements/$(basename "$lock") with $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
  # Console scripts embed the venv path, so it is built in place; the stamp written last
  # is what marks it complete (tools/run refuses a venv without it).
  "$PY" -m venv "$venv"
  pip_install "$venv/bin/python" "$lock" || die "pip install into $venv failed; the unfinished venv is never used (rerun 'make setup')"
  # place_tf itself, editable: `import place_tf` works in this venv from anywhere (a
  # notebook, another directory) and follows the checkout.
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input --no-deps \
    --no-build-isolation -e "$REPO" >/dev/null || die "pip install -e $REPO failed"
  "$venv/bin/python" -m pip check >/dev/null || log "warning: pip check reports inconsistencies"
  touch "$venv/$stamp" "$venv/.place-tf-complete"
}

need_root() {
  [ "$(id -u)" = 0 ] || die "the TFX root filesystem needs root (debootstrap, chroot, mount namespaces): TFX 1.21 needs glibc >= 2.39 and this host has $(glibc_version). Run 'sudo make setup-tfx' once, or run the pipeline on a glibc >= 2.39 host or in the component image (README 'Supported hosts')"
}

build_rootfs() {
  # Debian 13 minbase with python3 + venv. Cached independently of the lock.
  local rootfs="$1"
  if [ -f "$rootfs/.place-tf-rootfs-complete" ]; then
    return
  fi
  check_disk "$CACHE" 7000
  if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap with apt"
    command -v apt-get >/dev/null || die "debootstrap is missing and apt-get is not available: install debootstrap"
    apt-get update -qq >/dev/null || die "apt-get update failed (network?)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null \
      || die "could not install debootstrap with apt-get"
  fi
  rm -rf "$rootfs.building" "$rootfs"
  log "building Debian 13 ($SUITE) root filesystem in $rootfs (about a minute)"
  if ! debootstrap --variant=minbase --include=python3,python3-venv,python3-dev,g++,ca-certificates \
      "$SUITE" "$rootfs.building" > "$CACHE/debootstrap.log" 2>&1; then
    tail -5 "$CACHE/debootstrap.log" >&2
    die "debootstrap failed (log: $CACHE/debootstrap.log); the partial tree is removed on the next run"
  fi
  touch "$rootfs.building/.place-tf-rootfs-complete"
  mv "$rootfs.building" "$rootfs"
}

setup_rootfs_venv() {
  # The Debian 13 root filesystem with requirements/tfx.lock in /opt/place-tf/venv-<hash>.
  # Prints the venv's path inside the root filesystem.
  need_root
  mkdir -p "$CACHE"
  local lock="$LOCKS/tfx.lock" rootfs="$CACHE/$SUITE"
  build_rootfs "$rootfs"
  # Trust the host's CA store (corporate proxies, mirrors) as well as Debian's.
  if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    mkdir -p "$rootfs/etc/ssl/certs"
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  fi
  cp -L /etc/resolv.conf "$rootfs/etc/resolv.conf" 2>/dev/null || true
  local venv_in
  venv_in="/opt/place-tf/venv-$(lock_hash "$lock")"
  local venv="$rootfs$venv_in"
  if [ -f "$venv/.place-tf-complete" ]; then
    log "root filesystem environment is up to date ($venv)"
  else
    check_disk "$CACHE" 6000
    check_registry
    # Older venvs (other lock hashes) are dropped: one environment per cache. The venv
    # is built in place (console scripts embed its path); the stamp written last marks
    # it complete, and tools/run refuses a venv without it.
    rm -rf "$rootfs"/opt/place-tf/venv-*
    mkdir -p "$rootfs/opt/place-tf"
    log "installing requirements/tfx.lock into $venv (about 3 minutes)"
    PLACE_ENV=rootfs PLACE_ROOTFS="$rootfs" PLACE_ROOTFS_VENV="" \
      "$REPO/tools/run" --raw bash -c "set -e; python3 -m venv $venv_in; py=$venv_in/bin/python; \
        \$py -m pip install --quiet --disable-pip-version-check --no-input --no-deps --require-hashes -r '$lock'" \
      || die "pip install inside the root filesystem failed; the unfinished venv is never used (rerun 'make setup')"
    touch "$venv/.place-tf-complete"
  fi
  ROOTFS="$rootfs" ROOTFS_VENV="$venv_in"
}

write_env() {  # KEY=VALUE... -> .place-env (read by tools/run)
  printf '%s\n' "$@" > "$ENV_FILE.tmp"
  mv "$ENV_FILE.tmp" "$ENV_FILE"
}

target="${1:-}"
case "$target" in ""|tfx) ;; *) die "usage: tools/setup_env.sh [tfx]" ;; esac

mode="${PLACE_ENV:-auto}"
case "$mode" in
  auto) if glibc_at_least 2.39; then mode=venv; else mode=split; fi ;;
  venv|split|rootfs) ;;
  *) die "PLACE_ENV must be auto, venv, split or rootfs (got '$mode')" ;;
esac
if [ "$mode" = venv ] && ! glibc_at_least 2.39; then
  die "PLACE_ENV=venv puts TFX 1.21 into the venv, which needs glibc >= 2.39 (host has $(glibc_version)); use PLACE_ENV=split (the default here)"
fi
if [ "$mode" != rootfs ] && ! glibc_at_least 2.27; then
  die "TensorFlow 2.21's wheels need glibc >= 2.27 (host has $(glibc_version))"
fi
gpu=""
if [ "$mode" != rootfs ] && want_gpu; then gpu="gpu"; fi
log "environment kind: $mode${gpu:+ (with the CUDA wheels of TensorFlow)}"

case "$mode" in
  venv)
    setup_host_venv "$LOCKS/${gpu:+tfx-gpu}${gpu:-tfx}.lock"
    write_env PLACE_ENV=venv "PLACE_VENV=$REPO/.venv"
    ;;
  split)
    setup_host_venv "$LOCKS/${gpu:-core}.lock"
    # Keep a root filesystem that is already built (this or an earlier setup); build it
    # now only when asked (`make setup-tfx`): tools/run builds it on the first TFX command.
    ROOTFS="$CACHE/$SUITE" ROOTFS_VENV="/opt/place-tf/venv-$(lock_hash "$LOCKS/tfx.lock")"
    if [ "$target" = tfx ]; then setup_rootfs_venv; fi
    write_env PLACE_ENV=split "PLACE_VENV=$REPO/.venv" "PLACE_ROOTFS=$ROOTFS" \
      "PLACE_ROOTFS_VENV=$ROOTFS_VENV" "PLACE_TF_CACHE=$CACHE"
    if [ ! -f "$ROOTFS$ROOTFS_VENV/.place-tf-complete" ]; then
      log "TFX commands (make pipeline, the TFX tests) need glibc >= 2.39; here they run in a"
      log "Debian 13 root filesystem that needs root and is built on first use ('sudo make setup-tfx' builds it now)"
    fi
    ;;
  rootfs)
    setup_rootfs_venv
    write_env PLACE_ENV=rootfs "PLACE_ROOTFS=$ROOTFS" "PLACE_ROOTFS_VENV=$ROOTFS_VENV" \
      "PLACE_TF_CACHE=$CACHE"
    ;;
esac
log "done; run commands with tools/run (or activate $REPO/.venv)"
