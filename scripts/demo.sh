#!/usr/bin/env bash
# The demo: start a vdev back end, boot a QEMU guest against it, and print what
# the guest measured.  Sets everything up first on a fresh Debian 12 machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
