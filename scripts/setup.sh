#!/usr/bin/env bash
# Everything vdev needs on a fresh Debian 12 machine (run as root): Debian
# packages (QEMU 7.2 and the tools the guest image is built from), then a venv
# with the package and its test extra, then `vdev` on PATH (a launcher in
# /usr/local/bin and bash completion: scripts/install-launcher.sh; skipped
# with VDEV_NO_LAUNCHER=1).  Safe to run again; it only installs what is
# missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(qemu-system-x86 qemu-utils busybox-static fio socat iperf3 cpio nbdkit
          python3 python3-venv python3-dev gcc libc6-dev libffi-dev liburing-dev xz-utils
          bash-completion)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.vdev-installed
# The native data plane (vdev/_native) is compiled by pip install: rebuild when
# any of its sources is newer than the last install.
native_changed=$( [ -f "$stamp" ] && find vdev/_native -newer "$stamp" \( -name '*.c' -o -name '*.h' -o -name '*.cdef' -o -name 'build.py' \) | head -n 1 || true )
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] || [ -n "$native_changed" ]; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test]'
    touch "$stamp"
fi
if [ -z "${VDEV_NO_LAUNCHER:-}" ]; then
    bash scripts/install-launcher.sh
fi
