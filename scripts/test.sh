#!/usr/bin/env bash
# Set up (scripts/setup.sh --test), lint and check the formatting (ruff) and run the test suite. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test || exit 1
.venv/bin/ruff check . || { echo "ruff: lint errors above (config: [tool.ruff] in pyproject.toml)"; exit 1; }
.venv/bin/ruff format --check . || { echo "ruff: run '.venv/bin/ruff format .' (config: [tool.ruff])"; exit 1; }
# Two workers (pytest-xdist), each taking whole test files (module fixtures start once): the suite is compile-
# and subprocess-bound, and two files at a time use a 2-core machine's idle time. JAXSERVE_TEST_WORKERS=0: one process.
workers=${JAXSERVE_TEST_WORKERS:-2}
xdist=()
[ "$workers" -gt 0 ] && xdist=(-n "$workers" --dist loadfile)
.venv/bin/python -m pytest -q -p no:cacheprovider "${xdist[@]}" --durations=15 "$@"  # and the 15 slowest tests
rc=$?
if [ "$rc" -eq 5 ]; then  # pytest: no tests collected; not a failure of the code under test
  echo "no tests ran"
  exit 0
fi
exit "$rc"
