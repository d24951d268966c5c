#!/usr/bin/env bash
# Sets up everything `hybrid` needs on a fresh Debian/Ubuntu machine: the system libraries for
# offscreen MuJoCo rendering, a virtual environment, torch, and the project with its dev extras.
# Idempotent: rerunning it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

# 1. System libraries for offscreen rendering (EGL through Mesa; OSMesa as the fallback).
APT_PACKAGES="libegl1 libegl-mesa0 libgl1-mesa-dri libgbm1 libosmesa6 libglib2.0-0"
missing=$(for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$missing" ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "setup: installing system packages: $missing"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  else
    echo "setup: missing system packages for offscreen rendering: $missing" >&2
    echo "setup: run as root (or with sudo): apt-get install -y $missing" >&2
    exit 1
  fi
fi

# 2. The virtual environment, torch first (so nothing pulls a different build), then the project.
# torch installs with pip, which picks the build pip is configured for (a local CPU wheel, here);
# the rest with uv (itself installed by pip), in seconds where pip takes minutes, from pip's
# configured indexes and find-links; pip does the work wherever uv cannot (or with
# HYBRID_INSTALLER=pip). Both compile the bytecode at install (pip by default, uv when told):
# where PYTHONDONTWRITEBYTECODE is set, Python never caches it, and every process of a
# quickstart would compile lightning, transformers and diffusers from source again.
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
# Versions are read from the package metadata: importing torch before numpy is installed warns.
version_of() { "$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null; }
# pip's own sources (config files and PIP_* variables), for uv, which reads neither
pip_sources() {
  $PIP config list 2>/dev/null |
    sed -n "s/^[^.]*\.\(find-links\|index-url\|extra-index-url\)='\(.*\)'$/\1 \2/p" |
    while read -r key values; do for v in $values; do echo "--$key $v"; done; done | sort -u
}
install() {
  if [ "${HYBRID_INSTALLER:-uv}" = uv ] && { [ -x "$VENV/bin/uv" ] || $PIP install uv >/dev/null 2>&1; }; then
    # shellcheck disable=SC2046
    "$VENV/bin/uv" pip install -q --compile-bytecode --python "$VENV/bin/python" $(pip_sources) "$@" && return
    echo "setup: uv could not install $*; pip installs it instead" >&2
  fi
  $PIP install "$@"
}
if ! version_of torch >/dev/null; then
  echo "setup: installing torch==$TORCH_VERSION"
  $PIP install "torch==$TORCH_VERSION"
fi
installed_torch=$(version_of torch)  # with its build (2.13.0+cpu), which uv must keep
constraints=$(mktemp)
echo "torch==$installed_torch" > "$constraints"
echo "setup: installing hybrid and its dependencies (torch pinned to $installed_torch)"
install -c "$constraints" -e ".[dev]"
rm -f "$constraints"
echo "setup: done ($VENV)"
