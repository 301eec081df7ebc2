"""The persistent kernels' grid barrier (``grid_barrier`` of xlstm/kernels/lstm_persistent.cu),
model-checked on the CPU.

The barrier needs a GPU to run, and its memory ordering is the CUDA memory model's business:
it is cooperative_groups' ``sync_grids`` as written for sm < 70 (``__syncthreads``; thread 0:
``__threadfence``, ``atomicAdd``, volatile polling, ``__threadfence``; ``__syncthreads``), which
is correct on every later architecture too. What the CPU can prove is its counting: with the
source's increments (block 0 adds 0x80000000 - (NB-1), every other block 1) and its flip test
(bit 31 of old ^ now), on one 32-bit counter zeroed per launch and reused for every step, in
EVERY interleaving of NB blocks over R rounds: no block leaves round r before all NB blocks
have arrived at round r, and no interleaving deadlocks. The two expressions are matched in the
source text, so changing either there fails here until the model is updated.
"""
from __future__ import annotations

import functools

import pytest

from xlstm.kernels import PERSISTENT_SOURCE, kernel_path

MASK = 0xFFFFFFFF
ADD_SRC = "const unsigned int add = blockIdx.x == 0 ? 0x80000000u - (gridDim.x - 1u) : 1u;"
FLIP_SRC = "while (((old ^ *(volatile unsigned int*)barrier) & 0x80000000u) == 0u) {"


def source_add(k: int, nb: int) -> int:
    return (0x80000000 - (nb - 1)) & MASK if k == 0 else 1


def flipped(old: int, now: int) -> bool:
    return ((old ^ now) & 0x80000000) != 0


def explore(nb: int, rounds: int, add=source_add) -> str | None:
    """Every interleaving of nb blocks passing `rounds` barriers; None, or what went wrong.

    A block is (round, old): old is None before it arrives at that round's barrier, else the
    value its atomicAdd returned. Moves: arrive (old = counter; counter += add) or leave
    (allowed once the counter's bit 31 differs from old's; the block goes to the next round)."""

    @functools.lru_cache(maxsize=None)
    def visit(counter: int, blocks: tuple) -> str | None:
        if all(r == rounds for r, _ in blocks):
            return None
        moves = 0
        for k, (r, old) in enumerate(blocks):
            if r == rounds:
                continue
            if old is None:                                   # arrive
                nxt = blocks[:k] + ((r, counter),) + blocks[k + 1:]
                moves += 1
                err = visit((counter + add(k, nb)) & MASK, nxt)
            elif flipped(old, counter):                       # leave round r
                late = [j for j, (rj, oj) in enumerate(blocks) if rj < r or (rj == r and oj is None)]
                if late:
                    return f"block {k} left round {r} before block(s) {late} arrived"
                nxt = blocks[:k] + ((r + 1, None),) + blocks[k + 1:]
                moves += 1
                err = visit(counter, nxt)
            else:
                continue
            if err:
                return err
        return None if moves else f"deadlock: counter {counter:#x}, blocks {blocks}"

    return visit(0, tuple((0, None) for _ in range(nb)))


def test_the_model_matches_the_kernel_source():
    src = kernel_path(PERSISTENT_SOURCE).read_text(encoding="utf-8")
    assert ADD_SRC in src, "grid_barrier's increments changed: update source_add"
    assert FLIP_SRC in src, "grid_barrier's flip test changed: update flipped"
    # the backend zeroes a fresh counter for every launch (the model starts at 0)
    be_src = (kernel_path(PERSISTENT_SOURCE).parent.parent / "backends" / "cupy_backend.py").read_text()
    assert "barrier = self.xp.zeros(1, np.uint32)" in be_src


@pytest.mark.parametrize("nb,rounds", [(1, 3), (2, 4), (3, 3), (4, 2)])
def test_barrier_never_passes_early_nor_deadlocks(nb, rounds):
    assert explore(nb, rounds) is None


def test_the_model_catches_broken_increments():
    # the model must be able to fail: a round that adds one too little never flips (a hang),
    # one that adds one too much flips before the last block arrives (an early pass)
    hang = explore(3, 2, add=lambda k, nb: (0x80000000 - nb) & MASK if k == 0 else 1)
    early = explore(3, 2, add=lambda k, nb: (0x80000000 - (nb - 2)) & MASK if k == 0 else 1)
    assert hang and hang.startswith("deadlock")
    assert early and "before" in early


def test_counter_reuse_over_many_rounds_in_order():
    # the low 31 bits return to 0 after each round and bit 31 alternates, for 2^32 wrap-arounds
    for nb in (1, 2, 7, 132, 1024):
        c = 0
        for r in range(5):
            for k in reversed(range(nb)):
                old = c
                c = (c + source_add(k, nb)) & MASK
                assert flipped(old, c) == (k == 0), (nb, r, k)   # only the last arrival flips
            assert c & 0x7FFFFFFF == 0 and (c >> 31) == (r + 1) % 2
