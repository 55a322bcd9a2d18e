#!/usr/bin/env bash
# Sets up a virtualenv, builds and installs vmmpy (Rust core via maturin), and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q ".[test]"
python -m pytest -q -p no:cacheprovider tests "$@"
