#!/usr/bin/env bash
# The whole test suite, QEMU tests included, on a fresh Debian 12 machine as root.
# Extra arguments go to pytest (e.g. `scripts/test.sh -m "not qemu"`).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# QEMU tests must run, not skip, when this script runs them: a missing QEMU
# is a set-up failure, not a reason for a green run.
export VDEV_REQUIRE_QEMU=1
# pytest's default import mode refuses two test files with one basename in
# different directories (CI failed that way once): say so before pytest does.
dups=$(find tests -name 'test_*.py' -printf '%f\n' | sort | uniq -d)
if [ -n "$dups" ]; then
    echo "test.sh: test files share a basename: $dups" >&2
    exit 1
fi
.venv/bin/python -m pytest -v --durations=15 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
exit "$rc"
