#!/usr/bin/env bash
# Sets up .venv (pinned) and runs the fast tests. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m slow` for the long ones.
source "$(dirname "$0")/setup_env.sh"
exec .venv/bin/python -m pytest -q "$@"
