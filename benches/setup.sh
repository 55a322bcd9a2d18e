#!/bin/bash
# Bench set-up (not part of scripts/test.sh): QEMU 7.2 from Debian, for the side-by-side benches in
# benches/test_bench_vs_qemu.py.
set -euo pipefail
if ! command -v qemu-system-x86_64 >/dev/null; then
    apt-get update -q
    apt-get install -y -q qemu-system-x86
fi
qemu-system-x86_64 --version | head -1
