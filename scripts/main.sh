#!/usr/bin/env bash
# Sets up .venv (pinned) and runs the main job on the offline MNIST digits.
# Extra arguments are flags of examples/quantize_digits.py (see --helpfull).
source "$(dirname "$0")/setup_env.sh"
exec .venv/bin/python examples/quantize_digits.py "$@"
