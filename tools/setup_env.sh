#!/usr/bin/env bash
# One set-up command for PLACE-TF (called by `make setup`).
#
# Two kinds of environment, same lock file:
#   venv   - host glibc >= 2.39: a plain .venv in the repo.
#   rootfs - older hosts (e.g. Debian 12, glibc 2.36): TFX 1.21's binary wheels
#            (ml-metadata, TFDV, tfx-bsl) are manylinux_2_39, so we build a Debian 13
#            root filesystem with debootstrap and put the venv inside it. It is cached
#            outside the repo, keyed by the lock file's hash, and entered by tools/run.
# PLACE_ENV=rootfs forces the rootfs path on a new host (for testing both paths).
#
# Every cached piece is built under a *.building name and renamed into place only when
# complete, so a half-built cache (killed setup, full disk) is never used: it is removed
# and rebuilt on the next run.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCK="$REPO/requirements.lock"
CACHE="${PLACE_TF_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/place-tf}"
SUITE=trixie
ENV_FILE="$REPO/.place-env"

die() { echo "setup: error: $*" >&2; exit 1; }
log() { echo "setup: $*" >&2; }

[ -f "$LOCK" ] || die "missing $LOCK (regenerate it with 'make lock')"
LOCK_HASH="$(sha256sum "$LOCK" | cut -c1-16)"

glibc_ok() {
  # True when the host glibc is >= 2.39 (what TFX 1.21's wheels need).
  local v
  v="$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}')" || return 1
  [ -n "$v" ] || return 1
  python3 - "$v" <<'EOF'
import sys
major, minor = (int(x) for x in sys.argv[1].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 39) else 1)
EOF
}

check_disk() {
  # $1 = directory, $2 = MiB needed
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
  if ! python3 - "$url" <<'EOF'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1] + "pip/", timeout=20)
except Exception as e:  # noqa: BLE001
    print(f"{type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1)
EOF
  then
    die "cannot reach the package registry at $url (no network, or set PIP_INDEX_URL to a mirror)"
  fi
}

pip_install_lock() {
  # $1 = python interpreter of the venv to fill
  "$1" -m pip install --quiet --disable-pip-version-check --no-input --no-deps \
    --require-hashes -r "$LOCK"
  "$1" -m pip check >/dev/null || log "warning: pip check reports inconsistencies"
}

setup_venv() {
  local venv="$REPO/.venv"
  if [ -f "$venv/.place-tf-complete" ] && [ -f "$venv/.place-tf-lock-$LOCK_HASH" ]; then
    log "venv is up to date ($venv)"
  else
    check_disk "$REPO" 6000
    check_registry
    rm -rf "$venv"
    log "creating $venv"
    # Console scripts embed the venv path, so it is built in place; the stamp written
    # last is what marks it complete (tools/run refuses a venv without it).
    python3 -m venv "$venv"
    pip_install_lock "$venv/bin/python"
    touch "$venv/.place-tf-lock-$LOCK_HASH"
    touch "$venv/.place-tf-complete"
  fi
  printf 'PLACE_ENV=venv\nPLACE_VENV=%s\n' "$venv" > "$ENV_FILE"
}

need_root() {
  [ "$(id -u)" = 0 ] || die "the rootfs environment needs root (debootstrap, chroot, mount namespaces); run 'sudo make setup', or use a host with glibc >= 2.39"
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

setup_rootfs() {
  need_root
  mkdir -p "$CACHE"
  local rootfs="$CACHE/$SUITE"
  build_rootfs "$rootfs"
  # Trust the host's CA store (corporate proxies, mirrors) as well as Debian's.
  if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    mkdir -p "$rootfs/etc/ssl/certs"
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  fi
  cp -L /etc/resolv.conf "$rootfs/etc/resolv.conf" 2>/dev/null || true
  local venv_in="/opt/place-tf/venv-$LOCK_HASH"
  local venv="$rootfs$venv_in"
  if [ -f "$venv/.place-tf-complete" ]; then
    log "rootfs environment is up to date ($venv)"
  else
    check_disk "$CACHE" 6000
    check_registry
    # Older venvs (other lock hashes) are dropped: one environment per cache. The venv
    # is built in place (console scripts embed its path); the stamp written last marks
    # it complete, and tools/run refuses a venv without it.
    rm -rf "$rootfs"/opt/place-tf/venv-*
    mkdir -p "$rootfs/opt/place-tf"
    log "installing the locked stack into $venv (about 3 minutes)"
    PLACE_ENV=rootfs PLACE_ROOTFS="$rootfs" PLACE_VENV="" \
      "$REPO/tools/run" --raw bash -c "set -e; python3 -m venv $venv_in; py=$venv_in/bin/python; \
        \$py -m pip install --quiet --disable-pip-version-check --no-input --no-deps --require-hashes -r '$LOCK'" \
      || die "pip install inside the rootfs failed; the unfinished venv is never used (rerun 'make setup')"
    touch "$venv/.place-tf-complete"
  fi
  printf 'PLACE_ENV=rootfs\nPLACE_ROOTFS=%s\nPLACE_VENV=%s\n' "$rootfs" "$venv_in" > "$ENV_FILE"
}

mode="${PLACE_ENV:-auto}"
case "$mode" in
  auto) if glibc_ok; then mode=venv; else mode=rootfs; fi ;;
  venv|rootfs) ;;
  *) die "PLACE_ENV must be auto, venv or rootfs (got '$mode')" ;;
esac
if [ "$mode" = venv ] && ! glibc_ok; then
  die "PLACE_ENV=venv needs glibc >= 2.39 for TFX 1.21 (host has $(getconf GNU_LIBC_VERSION)); use PLACE_ENV=rootfs"
fi
log "environment kind: $mode (lock $LOCK_HASH)"
"setup_$mode"
log "done; run commands with tools/run"
