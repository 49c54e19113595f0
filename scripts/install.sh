#!/usr/bin/env bash
# Installs cqd (editable) and, on Debian/Ubuntu, the embedded Fashion-MNIST package.
# Usage: bash scripts/install.sh [test]     ("test" adds pytest and hypothesis)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
  if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
    # Optional: without it, cqd downloads Fashion-MNIST with torchvision on first use.
    ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist) \
      || echo "note: dataset-fashion-mnist not installed; cqd will try torchvision's download" >&2
  fi
fi
extra=""; [ "${1:-}" = "test" ] && extra="[test]"
python -m pip install -q -e ".${extra}"
