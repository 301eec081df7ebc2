"""Launch plan and picker of the persistent LSTM kernels (``xlstm/kernels/lstm_persistent.cu``).

No CUDA here: plain arithmetic on sizes and device limits, so it is tested on any machine.

A persistent launch runs NB co-resident blocks for all T steps; block k owns the hidden units
[k*H/NB, (k+1)*H/NB) (at most hs = ceil(H/NB)) and keeps its part of U in shared memory.
Per block, in elements of the dtype (see lstm_persistent.cuh):

    forward   4*hs*(H+1)  +  B*hs*4*KS        (U's gate columns + the K-split partial sums)
    backward  hs*(4H+1)   +  B*hs*KS          (U's rows          + the K-split partial sums)

The plan takes at most one block per SM (hs = ceil(H/SMs) units each, NB = ceil(H/hs)), one
thread per (group of ROW_BLOCK batch rows, unit, split) up to 512 threads, and the largest
power-of-two K-split KS <= min(32, sqrt(H)) that the threads allow. It refuses (PersistentUnfit,
with the numbers) when a block's shared memory exceeds what the device gives one block; the CuPy
backend then also checks the driver's occupancy for the compiled
kernel, because CuPy would shrink a cooperative grid that does not fit (with only a warning).

Which of persistent or per-step kernels runs is ``choose(...)``: a crossover table by device,
H and B, consulted only in mode "auto"; the mode is set per backend (``CupyBackend.persistent =
"auto" | "on" | "off"``) or by the environment variable XLSTM_PERSISTENT, and is "off" when
neither says (``mode_from_env``). The table's limits are conservative estimates (persistent
only where a step is a few microseconds of work and per-step launches dominate); the crossover
that ``xlstm bench --persistent on|off`` measures on a device is what belongs in it.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ..errors import InputError

MAX_THREADS = 512        # the kernels' __launch_bounds__
MAX_KSPLIT = 32          # threads per unit dot product (a power of two)
ROW_BLOCK = 4            # batch rows per work item: PERSIST_RB of lstm_persistent.cuh
SMEM_RESERVED = 1024     # bytes the driver reserves per block (sm_80 and later)
MODES = ("auto", "on", "off")
# CuPy before 14.2 compiles cooperative kernels with --device-c and links cudadevrt from a CUDA
# toolkit, which a pip-only install (cupy-cuda1Nx[ctk]) does not have
MIN_CUPY = (14, 2)
ENV = "XLSTM_PERSISTENT"


class PersistentUnfit(InputError):
    """The persistent kernels cannot run this shape on this device (says why)."""


def require_cupy(version: str) -> None:
    """PersistentUnfit naming ``version`` when that CuPy cannot build the cooperative kernels."""
    import re

    m = re.match(r"(\d+)\.(\d+)", str(version))
    if m is None or (int(m.group(1)), int(m.group(2))) < MIN_CUPY:
        need = ".".join(map(str, MIN_CUPY))
        raise PersistentUnfit(
            f"the persistent kernels need CuPy >= {need} (earlier versions link cooperative kernels "
            f"against a CUDA toolkit's cudadevrt); this is CuPy {version}: upgrade with "
            f"`pip install -U 'cupy-cuda13x[ctk]>={need}'` (or cupy-cuda12x), or use "
            f"persistent='off' (the per-step kernels)")


def smem_bytes(backward: bool, *, B: int, H: int, NB: int, KS: int, itemsize: int) -> int:
    """Dynamic shared memory of one block (persistent_smem_elems of the header, in bytes)."""
    hs = -(-H // NB)
    elems = hs * (4 * H + 1) + B * hs * KS if backward else 4 * hs * (H + 1) + B * hs * 4 * KS
    return elems * itemsize


@dataclass(frozen=True)
class Plan:
    """One persistent launch: grid NB, block nt, K-split KS, shared bytes per block."""
    NB: int
    nt: int
    KS: int
    smem_forward: int
    smem_backward: int


def plan(B: int, H: int, itemsize: int, *, sm_count: int, smem_per_block: int,
         smem_per_sm: int, NB: int | None = None) -> Plan:
    """The launch plan for [B,H] on a device with these limits, or PersistentUnfit.

    sm_count: multiprocessors; smem_per_block: the opt-in maximum of dynamic shared memory one
    block may use; smem_per_sm: shared memory of one SM. NB: force the grid (tests), else one
    block per SM.
    """
    if B < 1 or H < 1:
        raise PersistentUnfit(f"persistent kernels need B >= 1 and H >= 1, got B={B}, H={H}")
    if NB is None:
        # one block per SM, then as few blocks as give the same widest slice (a cheaper barrier)
        hs = -(-H // min(H, sm_count))
        NB = -(-H // hs)
    if not 1 <= NB <= H:
        raise PersistentUnfit(f"grid of {NB} blocks for H={H}: need 1 <= blocks <= H")
    hs = -(-H // NB)
    items = -(-B // ROW_BLOCK) * hs        # work items of a partial phase before the K-split
    nt = 256 if items <= 256 else min(MAX_THREADS, -(-items // 32) * 32)
    # the K-split trades the partial phase's H/KS serial steps against the pointwise phase's
    # 4*KS: at most sqrt(H) (and what the threads allow)
    KS = 1
    while KS * 2 <= min(MAX_KSPLIT, math.isqrt(H)) and items * KS * 2 <= nt:
        KS *= 2
    limit = min(smem_per_block, smem_per_sm - SMEM_RESERVED)
    while True:
        f = smem_bytes(False, B=B, H=H, NB=NB, KS=KS, itemsize=itemsize)
        b = smem_bytes(True, B=B, H=H, NB=NB, KS=KS, itemsize=itemsize)
        if max(f, b) <= limit or KS == 1:
            break
        KS //= 2                        # fewer partial sums before giving up
    if max(f, b) > limit:
        raise PersistentUnfit(
            f"H={H}, B={B}, {itemsize * 8}-bit: a block of the persistent kernels needs "
            f"{max(f, b)} bytes of shared memory (U's slice for {hs} units over {NB} blocks plus "
            f"partial sums), the device gives {limit}; use the per-step kernels "
            f"(persistent='off') or a smaller H or batch")
    return Plan(NB=NB, nt=nt, KS=KS, smem_forward=f, smem_backward=b)


# -- the picker -----------------------------------------------------------------------------
# Per device-name substring, the largest H and B for which "auto" picks the persistent kernels:
# estimates, conservative (only small H, where a step is launch-bound); the GPU session's
# crossover part measures where each path wins.
CROSSOVER = {
    "H200": {"max_H": 256, "max_B": 64},
    "H100": {"max_H": 256, "max_B": 64},
    "A100": {"max_H": 128, "max_B": 64},
    "": {"max_H": 128, "max_B": 64},     # any other device
}


def mode_from_env() -> str:
    """XLSTM_PERSISTENT (auto | on | off), default off; an unknown value is an error.

    The default is "off": a default should be a path a GPU has executed, and which ones have is
    in docs/VERIFICATION.md. "auto" follows the table; "on" forces them.
    """
    m = os.environ.get(ENV, "off").strip().lower() or "off"
    if m not in MODES:
        raise InputError(f"{ENV}={m!r}: expected one of {', '.join(MODES)}")
    return m


def crossover(device_name: str) -> dict:
    """The table row whose key is in ``device_name`` (the longest such key)."""
    key = max((k for k in CROSSOVER if k in device_name), key=len)
    return CROSSOVER[key]


def choose(mode: str, *, B: int, H: int, device_name: str) -> bool:
    """True when the persistent kernels should run (before the fit check)."""
    if mode not in MODES:
        raise InputError(f"persistent mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode != "auto":
        return mode == "on"
    row = crossover(device_name)
    return H <= row["max_H"] and B <= row["max_B"]
