#!/usr/bin/env bash
# Installs cqd (editable) and, on Debian/Ubuntu, the embedded Fashion-MNIST package.
# Usage: bash scripts/install.sh [test]     ("test" adds pytest and hypothesis)
# It installs into the first `python` (else `python3`) on PATH. Where that Python is externally
# managed (PEP 668: a distribution's own Python, whose pip refuses to install), or with CQD_VENV=1,
# it installs into a virtual environment .venv in the repository instead and says which commands to run.
# CQD_INSTALL_DRY_RUN=1 prints the commands that change something instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."

run() {  # a step that changes the machine: run it, or only print it in a dry run
  if [ -n "${CQD_INSTALL_DRY_RUN:-}" ]; then echo "+ $*"; else "$@"; fi
}

SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
apt_updated=""
apt_install() {  # Debian/Ubuntu packages, as root or with sudo; fails where neither is possible
  command -v apt-get >/dev/null && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; } || return 1
  [ -n "$apt_updated" ] || run $SUDO apt-get update -qq || return 1
  apt_updated=1
  run $SUDO apt-get install -y -qq "$@"
}

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  # Optional: without it, cqd downloads Fashion-MNIST with torchvision on first use.
  apt_install dataset-fashion-mnist \
    || echo "note: dataset-fashion-mnist not installed; cqd will try torchvision's download" >&2
fi

py=python; command -v python >/dev/null || py=python3
command -v "$py" >/dev/null || { echo "install.sh: error: neither python nor python3 is on PATH; install Python >= 3.10 first" >&2; exit 2; }
extra=""; [ "${1:-}" = "test" ] && extra="[test]"

# pip's own test (PEP 668): the marker file in the stdlib folder, outside a virtual environment
managed=$("$py" -c 'import os, sys, sysconfig
print(int(sys.prefix == sys.base_prefix and os.path.isfile(os.path.join(sysconfig.get_paths()["stdlib"], "EXTERNALLY-MANAGED"))))')
if [ "$managed" = 0 ] && [ "${CQD_VENV:-}" != 1 ]; then
  run "$py" -m pip install -q -e ".${extra}"
  exit 0
fi

if [ ! -x .venv/bin/python ]; then
  if ! "$py" -c 'import ensurepip, venv' 2>/dev/null; then  # Debian/Ubuntu ship venv's pip separately
    pkg=$("$py" -c 'import sys; print("python%d.%d-venv" % sys.version_info[:2])')
    apt_install "$pkg" || {
      echo "install.sh: error: $(command -v "$py") cannot make a virtual environment (no ensurepip); install $pkg (sudo apt-get install $pkg) and run this again" >&2
      exit 2
    }
  fi
  run "$py" -m venv .venv
fi
run .venv/bin/python -m pip install -q -e ".${extra}"
if [ "$managed" = 1 ]; then why="because $(command -v "$py") is externally managed (PEP 668)"; else why="as CQD_VENV=1 asks"; fi
cat <<EOF
cqd is installed in .venv, $why. Run it from there:
    .venv/bin/cqd demo
    .venv/bin/python -m pytest
or first \`source .venv/bin/activate\`, after which \`cqd\` and \`python\` are these.
EOF
