#!/usr/bin/env bash
# Issue 9's part of the GPU session: machine, every gpu test, NumPy vs CuPy vs cuDNN (plus the
# B=256 and graphs-off rows), the embedding-gradient micro-benchmark, README.md. A thin wrapper:
# everything is benchmarks/gpu_session.sh's (run that for the whole session).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # default benchmarks/results/gpu-h200
exec bash "$(dirname "${BASH_SOURCE[0]}")/gpu_session.sh" "${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/benchmarks/results/gpu-h200}" \
    machine tests tests-persistent bench embedding report
