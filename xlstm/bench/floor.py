"""The GEMM floor: the GEMMs one training step of the layer issues, alone, timed like the step."""
from __future__ import annotations

import numpy as np


class GemmFloor:
    """The GEMMs of one training step of the layer, alone, with the layer's operand layouts.

    Per layer: forward ``X2 @ W`` into the gate buffer, then T times ``h[t] @ U`` (into the
    step's gate rows); backward T times ``dz[t] @ U^T`` (U^T made contiguous once per call,
    as the layer does), then ``X2^T @ dZ`` (dW), ``H_prev^T @ dZ`` (dU), ``dZ @ W^T`` (dx).
    Buffers are allocated once here; the timed calls only multiply. Small per-step GEMMs run
    on one OpenBLAS thread, as in the NumPy backend (``backends.blas.SMALL_GEMM_MACS``).
    With a precision other than float32 the products are the backend's in that mode (U and U^T
    rounded once per call, as the layer does; on NumPy that includes the emulation's rounding).

    On the cupy backend the floor is timed the way the layer runs ("within 1.15x of
    its own GEMM floor" must compare like with like): every product goes through the
    backend's ``matmul`` / ``matmul_add`` as in ``lstm.py`` (the per-step ones into the gate
    rows and dh with beta = 1, through ``CublasGemm``), and where the backend replays CUDA
    graphs (``graphs_active()``) each layer's two per-step loops are captured once into a
    graph and replayed (``captured`` True); U^T is still copied per call, outside the graph,
    and the tf32/bf16 weight operands are rounded once, at the capture.
    """

    def __init__(self, xp, T, B, D, H, layers, dtype, seed=0, backend=None, precision="float32"):
        rng = np.random.default_rng(seed)
        self.xp, self.T = xp, T
        self.backend, self.precision = backend, precision
        self.layer_like = getattr(backend, "name", None) == "cupy"
        self.captured = self.layer_like and bool(getattr(backend, "graphs_active", lambda: False)())
        self.graphs = {}              # (layer, direction) -> (graph, the scratch it must keep alive)
        self.capture_failure = None
        if self.layer_like:
            self.mm = lambda a, b, out: backend.matmul(a, b, out=out, precision=precision)
            self.operand = lambda a: backend.gemm_operand(a, precision)
        elif precision == "float32" or backend is None:
            self.mm = lambda a, b, out: xp.matmul(a, b, out=out)
            self.operand = lambda a: a
        else:
            self.mm = lambda a, b, out: backend.matmul(a, b, out=out, precision=precision)
            self.operand = lambda a: backend.gemm_operand(a, precision)

        def arr(*shape):
            return xp.asarray(rng.standard_normal(shape).astype(dtype) * 0.1)

        self.layers = []
        for k in range(layers):
            Dk = D if k == 0 else H
            self.layers.append(dict(
                x2=arr(T * B, Dk), W=arr(Dk, 4 * H), U=arr(H, 4 * H), UT=xp.empty((4 * H, H), dtype),
                gates=xp.empty((T, B, 4 * H), dtype), hs=arr(T + 1, B, H), dz=arr(T, B, 4 * H),
                tmp=xp.empty((B, 4 * H), dtype), dh=xp.zeros((B, H), dtype),
                dW=xp.zeros((Dk, 4 * H), dtype), dU=xp.zeros((H, 4 * H), dtype),
                dx=xp.empty((T * B, Dk), dtype)))

        # the NumPy backend runs small per-step GEMMs on one OpenBLAS thread; so does the floor
        self.one_thread = None
        if xp is np:
            from ..backends import blas

            if B * H * 4 * H <= blas.SMALL_GEMM_MACS:
                self.one_thread = blas.openblas_threads()

    def _loop(self, fn):
        ctl = self.one_thread
        n = ctl[0]() if ctl is not None else 1
        if n > 1:
            ctl[1](1)
        try:
            fn()
        finally:
            if n > 1:
                ctl[1](n)

    def _replayed(self, key, loop, op, gates):
        """``loop()`` once, as its graph: the first call runs it eagerly (so handles, scratch and
        kernels exist: capture must not allocate) and captures it without running it; later
        calls replay the graph.

        The graph has the addresses of the backend's scratch baked in (bf16: the cast left
        operand), which the backend's own cache may drop at any time: ``prepare_capture`` names
        them (as for the layer's graphs) and the entry keeps them alive. A capture the device
        refuses leaves the floor eager (``captured`` False), as the layer's loops would be."""
        entry = self.graphs.get(key)
        if entry is None:
            from ..backends.cuda_graphs import CaptureFailed, capture

            loop()
            keep = self.backend.prepare_capture(op, {"gates": gates, "precision": self.precision})
            try:
                self.graphs[key] = (capture(self.xp, loop), keep)
            except CaptureFailed as e:
                self.captured, self.capture_failure = False, str(e)
            return
        entry[0].launch(self.xp.cuda.get_current_stream())

    def _weights(self, L, name, make):
        """The per-call weight operand; with graphs the one captured (stable address)."""
        if not self.captured:
            return self.operand(make())
        if name not in L:
            L[name] = self.operand(make())
        return L[name]

    def forward(self):
        T = self.T
        for k, L in enumerate(self.layers):
            mm = self.mm
            mm(L["x2"], L["W"], L["gates"].reshape(L["x2"].shape[0], -1))
            hs, tmp, gates = L["hs"], L["tmp"], L["gates"]
            U = self._weights(L, "Uop", lambda: L["U"])
            if self.layer_like:
                be, P = self.backend, self.precision

                def loop():
                    for t in range(T):
                        be.matmul_add(hs[t], U, gates[t], P)
            else:
                def loop():
                    for t in range(T):
                        mm(hs[t], U, tmp)
            if self.captured:
                self._replayed((k, "forward"), loop, "lstm_forward_sequence", gates)
            else:
                self._loop(loop)

    def backward(self):
        xp, T = self.xp, self.T
        for k in reversed(range(len(self.layers))):
            L = self.layers[k]
            mm = self.mm
            H = L["U"].shape[0]
            dz, dh = L["dz"], L["dh"]
            if self.layer_like:
                L["UT"][...] = L["U"].T            # the layer's per-call U^T copy, outside the loop
                UT = self._weights(L, "UTop", lambda: L["UT"])
                be, P = self.backend, self.precision

                def loop():
                    for t in range(T - 1, -1, -1):
                        be.matmul_add(dz[t], UT, dh, P)
            else:
                UT = self.operand(xp.ascontiguousarray(L["U"].T))

                def loop():
                    for t in range(T - 1, -1, -1):
                        mm(dz[t], UT, dh)
            if self.captured:
                self._replayed((k, "backward"), loop, "lstm_backward_sequence", dz)
            else:
                self._loop(loop)
            dz2 = dz.reshape(-1, dz.shape[2])
            if self.layer_like:
                be, P = self.backend, self.precision
                be.matmul_add(L["x2"].T, dz2, L["dW"], P)
                be.matmul_add(L["hs"][:-1].reshape(-1, H).T, dz2, L["dU"], P)
            else:
                mm(L["x2"].T, dz2, L["dW"])
                mm(L["hs"][:-1].reshape(-1, H).T, dz2, L["dU"])
            mm(dz2, L["W"].T, L["dx"])

    def step(self):
        self.forward()
        self.backward()


def step_flops(T, B, D, H, layers) -> float:
    """Multiply-adds x2 of one training step: 6 GEMMs of [T*B x D_k x 4H] size per layer."""
    total = 0.0
    for k in range(layers):
        Dk = D if k == 0 else H
        total += 2.0 * T * B * 4 * H * (Dk + H) * 3  # forward (x, h) + backward (dh, dx) + (dW, dU)
    return total
