#!/usr/bin/env bash
# The whole test suite, QEMU tests included, on a fresh Debian 12 machine as root.
# Extra arguments go to pytest (e.g. `scripts/test.sh -m "not qemu"`).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# QEMU tests must run, not skip, when this script runs them: a missing QEMU
# is a set-up failure, not a reason for a green run.
export VDEV_REQUIRE_QEMU=1
.venv/bin/python -m pytest -v --durations=15 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
exit "$rc"
