# Sourced by main.sh and test.sh: creates .venv with the pinned CPU requirements
# and fliqs_keras installed in it (editable), once per change of the pins.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))'; then
  echo "fliqs_keras needs Python 3.11 to 3.13 (the pinned NumPy 2.4 and TensorFlow 2.21); $PYTHON is $("$PYTHON" --version 2>&1)." >&2
  echo "Set PYTHON=/path/to/python3.x and run again." >&2
  exit 1
fi
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.fliqs-installed
wanted=$(cat requirements/cpu.txt setup.py | sha256sum | cut -d' ' -f1)
if [[ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]]; then
  echo "Installing the pinned environment into .venv (first run: a few minutes)..." >&2
  # pip's and the build backend's own output goes to a log, shown only when an install fails.
  log=.venv/install.log
  if ! { .venv/bin/python -m pip install --quiet --disable-pip-version-check pip==26.3 &&
         .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements/cpu.txt &&
         .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
       } > "$log" 2>&1; then
    cat "$log" >&2
    echo "Installing into .venv failed (the log above is in $log)." >&2
    exit 1
  fi
  echo "$wanted" > "$stamp"
fi
export TF_CPP_MIN_LOG_LEVEL=3 TF_ENABLE_ONEDNN_OPTS=0 KERAS_BACKEND=tensorflow
