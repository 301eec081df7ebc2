#!/usr/bin/env bash
# Issue 12's part of the GPU session: the gpu tests of tests/test_precision.py and
# tests/test_cuda_graphs.py (tf32/bf16 against the CPU-derived bounds, replay equal to eager),
# tf32 and bf16 next to cuDNN in the same mode over the issue's grid, and the short training
# runs (float32, bf16), then README.md. A thin wrapper: everything is benchmarks/gpu_session.sh's.
#
#   bash benchmarks/gpu_precision.sh OUT_DIR
export XLSTM_GPU_TEST_FILES="tests/test_precision.py tests/test_cuda_graphs.py"
exec bash "$(dirname "${BASH_SOURCE[0]}")/gpu_session.sh" "${1:?usage: bash benchmarks/gpu_precision.sh OUT_DIR}" \
    machine tests precision train report
