#!/usr/bin/env bash
# Re-resolve the exact pins, with hashes, from pyproject.toml's dependencies (`make lock`).
#
#   requirements/tfx.lock      core + tfx + dev: the root filesystem, the CPU component
#                              image, and the repo venv on hosts with glibc >= 2.39
#   requirements/tfx-gpu.lock  the same + TensorFlow's CUDA wheels (GPU component image,
#                              GPU hosts with glibc >= 2.39)
#   requirements/core.lock     core + dev: the rootless repo venv on older hosts
#   requirements/gpu.lock      core + dev + CUDA wheels: the same on a GPU host
#
# Every lock is universal (`uv pip compile --universal`, CPython >= 3.11, any platform:
# markers select per Python version) so one file serves the host's python3 (3.11 on
# Debian 12, 3.12 on Ubuntu 24.04) and Debian 13's 3.13. tfx.lock is resolved first and
# pins the others (as constraints), so a package has the same version in every
# environment. Existing pins are kept unless a declaration forces a change (uv reuses the
# output file's versions); `LOCK_UPGRADE=1 make lock` re-resolves to the newest.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
command -v uv >/dev/null || { echo "lock: needs uv (pip install uv)" >&2; exit 1; }
common=(--universal --python-version 3.11 --generate-hashes --no-header)
[ "${LOCK_UPGRADE:-0}" = 1 ] && common+=(--upgrade)

compile() {  # $1 = output lock, rest = uv arguments
  local out="$1"; shift
  uv pip compile pyproject.toml "${common[@]}" "$@" -o "$out" --quiet
  echo "lock: wrote $out ($(grep -c '^[a-z0-9]' "$out") packages)"
}

compile requirements/tfx.lock --extra tfx --extra dev
# A fixed relative path: uv writes it into the locks' "via -c ..." annotations.
pins=requirements/tfx-pins.txt
trap 'rm -f "$pins"' EXIT
# Pins without hashes (a constraint file carries no hashes).
sed -n 's/^\([A-Za-z0-9._-]*==[^ ;]*\)\( ; \([^\\]*\)\)\{0,1\}.*/\1 ; \3/p' requirements/tfx.lock \
  | sed 's/ ; $//' > "$pins"
compile requirements/tfx-gpu.lock --extra tfx --extra gpu --extra dev -c "$pins"
compile requirements/core.lock --extra dev -c "$pins"
compile requirements/gpu.lock --extra gpu --extra dev -c "$pins"
