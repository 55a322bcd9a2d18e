#!/usr/bin/env bash
# Sets up a virtualenv, builds and installs vmmpy, and runs the main demo: a guest reboots in the
# middle of its live migration between two VMMs on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q .
python -m vmmpy.demo
