#!/usr/bin/env bash
# Sets up a virtualenv, builds and installs vmmpy (Rust core via maturin), and runs the test suite:
# the Rust unit tests, then the Python suite (real KVM, real test guest).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q ".[test]"
# Lint and format: Rust (every unsafe block carries its SAFETY comment) and Python.
cargo fmt --check
cargo clippy --lib --quiet -- -D warnings -D clippy::undocumented_unsafe_blocks
ruff check python tests benches
ruff format --check python tests benches
# The native module's type stubs match the built module (run outside the source tree, so the
# installed package is what is checked).
(cd / && python -m mypy.stubtest vmmpy._native)
# The Rust core's unit tests (ACPI tables, CMOS, range tables, page transfer, dirty log on real KVM).
cargo test --lib --quiet
python -m pytest -q -p no:cacheprovider tests "$@"
