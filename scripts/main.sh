#!/usr/bin/env bash
# Sets up .venv (pinned) and runs the main job: a FLIQS search on the offline
# MNIST digits, then the export (policy, .keras models, verified TFLite, plot).
# Extra arguments are flags of examples/search.py (see --helpfull).
source "$(dirname "$0")/setup_env.sh"
exec .venv/bin/python examples/search.py "$@"
