"""The GPU session's plan, as data: its budget, its parts in order of value, and the targets.

``benchmarks/gpu_session.py`` runs it; ``benchmarks/gpu_report.py`` states the targets from what
it left. Nothing here runs anything.

The budget is ``TOTAL_SECONDS``, the one number the whole device call is planned against
(an H200, 15 minutes of device time per task of which start-up takes 1-2): every step has a
cap, the caps add up to at most ``TOTAL_SECONDS`` (tests/test_gpu_session.py holds the plan to
it), so no part can eat the time of a later one, and the call stays under
``HARD_LIMIT_SECONDS`` with room for a targeted rerun in the same window. The estimates are
what each step should take on an H200; the report shows both next to the measured seconds.
"""
from __future__ import annotations

from dataclasses import dataclass, field

TOTAL_SECONDS = 400          # the whole session on an H200, report included
HARD_LIMIT_SECONDS = 450     # the device call's timeout_s (the wheel install and the archive fit in 50 s)
REPORT_SECONDS = 5           # kept back from the last steps for the report

# what a later step may need, found out by the smoke part: a step that needs something the
# smoke part found unusable is skipped (NOT MEASURED, saying why) instead of failing
NEEDS = ("cupy", "nvmath", "graphs", "persistent")


@dataclass(frozen=True)
class Step:
    """One process of the session. kind: smoke | pytest | bench | train | report.

    args: the kind's arguments (pytest: test selection; bench: ``xlstm bench`` options beside
    the ones the runner adds: --backends cupy --out --name --budget --no-progress; train:
    ``xlstm train`` options beside --backend cupy --out). ``dry_args`` replace the sizes in a
    dry run on the CPU stand-in (the same commands, small enough for a test)."""
    name: str
    kind: str
    cap_s: float
    estimate_s: float
    args: tuple = ()
    dry_args: tuple | None = None
    needs: tuple = ("cupy",)
    what: str = ""


@dataclass(frozen=True)
class Part:
    name: str
    what: str
    steps: tuple = field(default_factory=tuple)

    @property
    def cap_s(self) -> float:
        return sum(s.cap_s for s in self.steps)

    @property
    def estimate_s(self) -> float:
        return sum(s.estimate_s for s in self.steps)


_TIMING = ("--layers", "1", "--rounds", "3", "--settle", "0.02", "--target-seconds", "0.2", "--repeat", "15")
_TINY = ("--hidden", "8", "--seq-len", "3", "--batch", "2", "--layers", "1", "--repeat", "2", "--min-repeat", "1",
         "--rounds", "1", "--settle", "0", "--no-memory", "--no-plot")
_GRID = ("--hidden", "64,256,1024,2048", "--seq-len", "64,256", "--batch", "64")


def _pytest(name, cap, est, *selection, needs=("cupy",), what=""):
    return Step(name, "pytest", cap, est, args=selection, needs=needs, what=what)


PARTS = (
    Part("smoke", "a tiny LSTM forward/backward with CUDA graphs on and off (bitwise equal), one "
                  "persistent launch; machine and versions. On failure the later parts run with graphs "
                  "off / persistent kernels off instead of all failing",
         (Step("smoke", "smoke", 15, 10, needs=()),)),
    # most valuable first; a persistent kernel's trap ends the process's CUDA context, so those
    # tests have a process of their own after the others; NCCL start-up last, with a short cap
    Part("tests", "the gpu tests (pytest -m gpu), one process per file, most valuable first", (
        _pytest("tests-cupy_backend", 30, 20, "tests/test_cupy_backend.py", "-k", "not persistent",
                what="CuPy backend against NumPy"),
        _pytest("tests-cuda_graphs", 20, 12, "tests/test_cuda_graphs.py", needs=("cupy", "nvmath"),
                what="graph replay equals eager, bitwise"),
        _pytest("tests-train_step_syncs", 15, 10, "tests/test_train_step_syncs.py",
                what="fused Adam, clip, cross-entropy; host syncs of a training step"),
        _pytest("tests-train", 36, 30, "tests/test_train.py",
                what="two GPU training runs bitwise equal; Ctrl-C + resume equals uninterrupted"),
        _pytest("tests-precision", 15, 10, "tests/test_precision.py", needs=("cupy", "nvmath"),
                what="tf32/bf16 within the CPU-derived bounds"),
        _pytest("tests-torch_module", 12, 8, "tests/test_torch_module.py",
                what="xlstm.torch.LSTM on CUDA tensors equals cuDNN's nn.LSTM, on a side stream"),
        _pytest("tests-persistent", 20, 12, "tests/test_cupy_backend.py", "-k", "persistent",
                needs=("cupy", "persistent"), what="persistent kernels against NumPy, bitwise repeatable"),
        _pytest("tests-distributed", 8, 6, "tests/test_distributed.py", what="one-rank NCCL run"),
    )),
    Part("record", "the numbers of record: CuPy (graphs on, per-step) vs cuDNN, float32, TF32 off, "
                   "B=64; host us per time step; the GEMM floor; then the LayerNorm cell", (
        Step("record", "bench", 45, 30, args=(*_GRID, "--persistent", "off", *_TIMING), dry_args=_TINY,
             what="H 64/256/1024/2048 x T 64/256"),
        Step("layernorm", "bench", 25, 15, args=("--layer-norm", "--hidden", "256,1024", "--seq-len", "64,256",
                                                 "--batch", "64", "--persistent", "off", "--no-plot", *_TIMING),
             dry_args=("--layer-norm", *_TINY), what="LayerNorm cell, H 256/1024 x T 64/256"),
    )),
    Part("precision", "tf32 and bf16 next to cuDNN TF32 / torch.autocast(bf16)", tuple(
        Step(f"precision-{m}", "bench", 27, 20,
             args=("--precision", m, "--hidden", "512,1024,2048", "--seq-len", "64,256", "--batch", "64",
                   "--max-cell-seconds", "15", "--no-plot", *_TIMING),
             dry_args=("--precision", m, *_TINY), needs=("cupy", "nvmath"), what=f"{m}, H 512..2048")
        for m in ("tf32", "bf16"))),
    Part("crossover", "persistent kernels off / on, each next to cuDNN: where each wins", (
        Step("crossover-off", "bench", 25, 18,
             args=("--persistent", "off", "--hidden", "64,256,512,1024", "--seq-len", "64,256", "--batch", "64",
                   "--no-plot", *_TIMING), dry_args=("--persistent", "off", *_TINY), what="per-step loop"),
        Step("crossover-on", "bench", 25, 18,
             args=("--persistent", "on", "--hidden", "64,256,512,1024", "--seq-len", "64,256", "--batch", "64",
                   "--no-plot", *_TIMING), dry_args=("--persistent", "on", *_TINY),
             needs=("cupy", "persistent"), what="persistent kernels"),
    )),
    Part("train", "`xlstm train --backend cupy`, the default run, short: steady steps/s and val loss", tuple(
        Step(f"train-{m}", "train", 15, 10,
             args=("--precision", m, "--steps", "150", "--eval-every", "150", "--save-every", "1000000",
                   "--log-every", "10"),
             dry_args=("--precision", m, "--steps", "4", "--eval-every", "4", "--save-every", "1000000",
                       "--log-every", "1", "--hidden", "8", "--max-chars", "20000"),
             needs=("cupy",) + (("nvmath",) if m == "bf16" else ()), what=m)
        for m in ("float32", "bf16"))),
    Part("torch-module", "a training step of xlstm.torch.LSTM beside torch.nn.LSTM (cuDNN) on the GPU", (
        Step("torch-module", "bench", 20, 12,
             args=("--torch-module", "--hidden", "256,1024", "--seq-len", "64", "--batch", "64", "--no-plot",
                   *_TIMING),
             dry_args=("--torch-module", *_TINY), what="H 256/1024, T 64, B 64"),
    )),
    Part("report", "README.md and targets.txt from the files above",
         (Step("report", "report", REPORT_SECONDS, 2, needs=()),)),
)


def grid(Hs, Ts, Bs) -> tuple:
    return tuple((H, T, B) for H in Hs for T in Ts for B in Bs)


@dataclass(frozen=True)
class Target:
    """One compass figure. Bench targets: ``metric`` of the CuPy rows of ``sources`` (bench steps)
    at every one of ``cells`` (H, T, B) must be <= ``limit``; where several sources hold a cell
    (the per-step loop and the persistent kernels), the best CuPy path counts. Test targets:
    every test named in ``tests`` (file::function, any parameters) passed."""
    key: str
    text: str
    metric: str | None = None
    limit: float | None = None
    cells: tuple = ()
    sources: tuple = ()
    tests: tuple = ()
    unit: str = "x"


_STEP = ("record", "crossover-off", "crossover-on")
TARGETS = (
    Target("step-h64", "CuPy train step <= 1.0x cuDNN at H=64 (float32, TF32 off, B=64)",
           "step_over_torch", 1.0, grid((64,), (64, 256), (64,)), _STEP),
    Target("step-h256-512", "CuPy train step <= 0.35x cuDNN at H=256 and 512",
           "step_over_torch", 0.35, grid((256, 512), (64, 256), (64,)), _STEP),
    Target("step-h1024", "CuPy train step <= 0.6x cuDNN at H=1024",
           "step_over_torch", 0.6, grid((1024,), (64, 256), (64,)), _STEP),
    Target("step-h2048", "CuPy train step <= 1.0x cuDNN at H=2048",
           "step_over_torch", 1.0, grid((2048,), (64, 256), (64,)), _STEP),
    Target("floor-h2048", "CuPy train step <= 1.15x its own captured GEMM floor at H=2048",
           "step_over_captured_floor", 1.15, grid((2048,), (64, 256), (64,)), ("record",)),
    Target("host-us", "host time <= 8 us per time step (worst of forward and backward)",
           "host_us", 8.0, grid((64, 256, 1024, 2048), (64, 256), (64,)), ("record",), unit=" us"),
    Target("bf16", "bf16 step <= 1.0x cuDNN under torch.autocast(bf16) for H >= 512",
           "step_over_torch", 1.0, grid((512, 1024, 2048), (64, 256), (64,)), ("precision-bf16",)),
    Target("train-bitwise", "two GPU training runs with one seed are bitwise equal",
           tests=("test_train.py::test_gpu_two_runs_with_one_seed_are_bitwise_equal",)),
    Target("resume", "Ctrl-C + resume equals the uninterrupted run on the GPU",
           tests=("test_train.py::test_gpu_interrupt_and_resume_equals_uninterrupted_bit_for_bit",
                  "test_train.py::test_gpu_ctrl_c_then_resume_equals_uninterrupted")),
)

# the NumPy column of the GPU table: this repository's CPU run of record, not CPU cells timed on
# the GPU host (whose CPU time would come out of the GPU window)
NUMPY_RESULTS = "benchmarks/results/cpu-full.json"


def steps():
    """Every step in session order, with its part: [(part, step)]."""
    return [(p, s) for p in PARTS for s in p.steps]
