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
# The static checks first: a lint or type error fails the build in seconds,
# not after the half-hour suite (configuration: [tool.ruff], [tool.mypy] in
# pyproject.toml; mypy is strict on vhost_user, vdev and backends).
if ! .venv/bin/ruff check .; then
    echo "test.sh: ruff check failed (the findings above); the tests were not run" >&2
    exit 1
fi
if ! .venv/bin/mypy; then
    echo "test.sh: mypy --strict failed (the errors above); the tests were not run" >&2
    exit 1
fi
# One pytest run serves the tests and the coverage floor: coverage.py
# measures vhost_user, vdev and backends in this process (not the `vdev`
# daemons tests start, not the C data plane), and records which test ran
# each line (--cov-context=test), so the floor below counts the in-process
# tier's lines (tests/unit) even though the QEMU tier runs in the same process.
# --cov-fail-under=0: pytest-cov would otherwise hold the whole run's total
# to fail_under, which is the unit tier's floor and is checked below.
.venv/bin/python -m pytest -v --durations=15 --cov --cov-context=test --cov-report= --cov-fail-under=0 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
if [ "$rc" -ne 0 ]; then
    exit "$rc"
fi
# The coverage floor ([tool.coverage.report] fail_under): line coverage of
# our Python by tests/unit (plus what importing the modules runs, which has
# no test context).  Checked on a whole run only: with arguments (-k, -m,
# one file) fewer tests ran and the figure means nothing.
if [ "$#" -ne 0 ]; then
    echo "test.sh: arguments given, so the coverage floor is not checked" >&2
    exit 0
fi
report=$(.venv/bin/python -m coverage report --contexts='^tests/unit/,^$' 2>&1)
cov_rc=$?
if [ "$cov_rc" -ne 0 ]; then
    echo "$report" >&2
    echo "test.sh: line coverage of tests/unit fell below the floor (fail_under in pyproject.toml)" >&2
    exit 1
fi
echo "test.sh: line coverage of tests/unit: $(echo "$report" | grep '^TOTAL' | awk '{print $NF}')," \
     "floor $(sed -n 's/^fail_under = //p' pyproject.toml)%"
exit 0
