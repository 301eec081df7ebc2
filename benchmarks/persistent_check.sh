#!/usr/bin/env bash
# Issue 11's part of the GPU session: the persistent-kernel gpu tests (in a process of their
# own) and --persistent off / on next to cuDNN over the issue's grid, then README.md. A thin
# wrapper: everything is benchmarks/gpu_session.sh's (run that for the whole session). Replace
# the UNMEASURED crossover table in xlstm/backends/persistent.py with what the README shows.
#
#   bash benchmarks/persistent_check.sh OUT_DIR
exec bash "$(dirname "${BASH_SOURCE[0]}")/gpu_session.sh" "${1:?usage: bash benchmarks/persistent_check.sh OUT_DIR}" \
    machine tests-persistent persistent report
