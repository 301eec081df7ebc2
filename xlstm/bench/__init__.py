"""``xlstm bench``: time the LSTM against its GEMM floor and PyTorch, per backend.

    xlstm bench                 # the full matrix: H 64..2048, T 16/64/256, 1 and 2 layers
    xlstm bench --quick         # a small subset in well under a minute
    python -m benchmarks ...    # the same command from a source checkout

For every cell (hidden size H, sequence length T, batch B, layers L; input size = H) and
every backend that can run here it measures, in one process and interleaved round by round
so that load from elsewhere hits every contender alike:

- ``fwd``: ``lstm.forward(x)``; ``step``: forward + ``lstm.backward(dy)`` (a training step
  without the optimizer), medians after warm-up, the GPU synchronised after each call;
- ``floor``: the same GEMMs that the layer calls (input GEMM [T*B,D]x[D,4H], T recurrent
  [B,H]x[H,4H], T backward [B,4H]x[4H,H], then dW, dU, dx), with the same operand layouts,
  alone: what no LSTM on this BLAS can beat, so ``step/floor`` is the cost of the rest; on
  CuPy timed as the step runs them (the same cuBLAS path, per-step loops replayed as CUDA
  graphs when the step's are: ``floor_captured``);
- ``host_fwd_us`` / ``host_bwd_us`` (CuPy): host time of one forward / backward call per time
  step and layer, the device idle before the call and not waited for after it;
- ``torch``: ``torch.nn.LSTM`` with the same weights on the same device (CPU; cuDNN on a
  GPU) when torch is installed, so ``step/torch`` says where we stand;
- peak memory: for NumPy the process's peak host RSS during one step (VmHWM, reset before
  the step) and the peak of NumPy's own allocations in the step (tracemalloc); for CuPy the
  memory pool's peak above its level before the step (torch: max_memory_allocated likewise).

Before any timing each cell is checked: the layer's outputs, input gradients and weight
gradients must match torch's (or the readable reference in ``xlstm/cell.py`` when torch is
missing; ``--layer-norm``: the NumPy backend in float64), and the CuPy backend must match the
NumPy backend. A mismatch is not timed: its row says "failed" and why, the other cells run,
and the command exits 1.

Cells run cheapest first; a cell whose estimated time exceeds ``--max-cell-seconds`` or
what is left of ``--budget`` is skipped and listed as such; a cell the backend refuses (a
forced path that does not fit) is an error row. Results go to stdout (a table with the
ratios) and to ``--out`` (default: a new ``runs/bench-NNN`` folder under the current
directory) as JSON, CSV and (with matplotlib) a PNG figure, one pair of panel rows per layer count; the JSON and CSV
are rewritten after every cell (``meta.partial`` until the run ends).
"""
# modules: machine (what ran where, memory, CuPy's first call), floor (the GEMM floor), cells (a
# cell's models, check and timed contenders), timing (interleaving, planner), report (tables,
# JSON/CSV/PNG and the readers other tools use), cli (arguments and the run)
from .cells import (PRECISION_TOLERANCE, TOLERANCE, BenchCheckError, Cell, CellRunner, Contender,
                    bench_cell, layer_norm_reference_step, reference_step)
from .cli import add_arguments, main, run
from .floor import GemmFloor, step_flops
from .machine import machine_info
from .report import COLUMNS, format_table, load, markdown_table, ok_rows, plot_results, write_outputs
from .timing import Planner, time_interleaved

__all__ = ["BenchCheckError", "COLUMNS", "Cell", "CellRunner", "Contender", "GemmFloor", "Planner",
           "PRECISION_TOLERANCE", "TOLERANCE", "add_arguments", "bench_cell", "format_table",
           "layer_norm_reference_step", "load", "machine_info", "main", "markdown_table", "ok_rows",
           "plot_results", "reference_step", "run", "step_flops", "time_interleaved", "write_outputs"]
