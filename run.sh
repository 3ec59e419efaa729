#!/usr/bin/env bash
# The two set-up-free entry points (see README):
#   ./run.sh generate [flags of scripts/generate.py]   greedy continuation with the embedded model
#   ./run.sh test [pytest args]                         the full test suite
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh
cmd="${1:-}"
shift || true
case "$cmd" in
  generate) exec python scripts/generate.py "$@" ;;
  test)
    status=0
    python -m pytest "$@" || status=$?
    # pytest exits 5 when it collected no test: that is a failure here, not a pass.
    [ "$status" -eq 5 ] && echo "run.sh: pytest ran no test" >&2 && exit 1
    exit "$status" ;;
  *) echo "usage: ./run.sh generate [flags] | ./run.sh test [pytest args]" >&2; exit 2 ;;
esac
