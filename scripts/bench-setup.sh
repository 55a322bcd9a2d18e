#!/usr/bin/env bash
# What the benchmarks need beyond the test suite: Debian's fio (benches/test_bench_blk.py compares
# the guest's disk reads with fio's on the same image). Not part of the test path.
set -euo pipefail
if ! command -v fio >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends fio >/dev/null
fi
fio --version
