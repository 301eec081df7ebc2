"""Interleaved timing of a cell's contenders, and the planner that fits cells into the budget."""
from __future__ import annotations

import time


def time_interleaved(contenders, repeats: int, warmup: int, rounds: int = 3, settle_s: float = 0.12) -> None:
    """Block-interleaved timing: ``rounds`` rounds, each timing every contender in a block.

    A contender's calls are split over the rounds (rotating the order between rounds), so
    load from elsewhere hits every contender alike; inside a block the calls run back to back.
    Before each block the process sleeps ``settle_s`` and runs ``warmup`` untimed calls: BLAS and
    OpenMP worker threads busy-wait for a while after their last parallel call (OpenBLAS about
    0.1 s), and on a 2-core machine one library's spinning threads would otherwise be timed as
    the next library's cost (measured here: 2-100x slower when NumPy and torch calls alternate).
    """
    n = len(contenders)
    rounds = max(1, min(rounds, repeats))
    per_round = [repeats // rounds + (1 if r < repeats % rounds else 0) for r in range(rounds)]
    for r in range(rounds):
        for j in range(n):
            c = contenders[(r + j) % n]
            if settle_s:
                time.sleep(settle_s)
            for _ in range(warmup):
                c.fn()
            for _ in range(per_round[r]):
                t0 = time.perf_counter()
                c.fn()
                c.times.append(time.perf_counter() - t0)


class Planner:
    """Predicts a cell's seconds from the step time per flop of the last cell run (cheapest first).

    Small cells overestimate the time per flop (Python overhead), so the prediction for the
    next, larger cell errs on the long side; each finished cell refines it.
    """

    def __init__(self, args):
        self.args = args
        self.start = time.perf_counter()
        self.step_sec_per_flop = {}

    def plan(self, est_step: float):
        """(repeats, warmup) for a cell whose training step takes about ``est_step`` seconds."""
        a = self.args
        repeats = int(min(a.repeat, max(a.min_repeat, a.target_seconds / max(est_step, 1e-9))))
        warmup = 1 if est_step * 4.4 < 2.0 else 0
        return repeats, warmup

    def predict(self, est_step: float, torch_on: bool = True) -> float:
        """Seconds for the whole cell: check, warm-up, timed rounds, memory, settling pauses."""
        a = self.args
        repeats, warmup = self.plan(est_step)
        per_call = est_step * (4.4 if torch_on else 2.7)   # steps + forwards of all contenders
        memory = 0.0 if a.no_memory else 2 * est_step
        return (2 * est_step + per_call * (repeats + warmup * a.rounds) + memory
                + a.rounds * 6 * a.settle + 0.5)

    def estimate(self, backend_name, cell, torch_on=True) -> float | None:
        k = self.step_sec_per_flop.get(backend_name)
        return None if k is None else self.predict(k * cell.flops(), torch_on)

    def learn(self, backend_name, cell, step_seconds):
        self.step_sec_per_flop[backend_name] = step_seconds / cell.flops()

    def left(self):
        return self.args.budget - (time.perf_counter() - self.start)
