"""Running the real ``xlstm`` command in a subprocess, as a user would (on NumPy, from this checkout)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = ["--hidden", "24", "--embed", "8", "--seq-len", "12", "--batch", "4", "--eval-every", "5",
        "--log-every", "1", "--no-progress"]


def xlstm(*argv, check=None, **kw):
    env = dict(os.environ, XLSTM_BACKEND="numpy", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "xlstm", *map(str, argv)], capture_output=True, text=True,
                       env=env, timeout=120, **kw)
    assert "Traceback" not in r.stderr, r.stderr
    if check is not None:
        assert r.returncode == check, r.stdout + r.stderr
    return r


def records(run, split="train"):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if json.loads(line)["split"] == split]


def gloo_missing() -> str | None:
    """Why ``--nproc`` cannot run here (no torch, or no gloo backend in this build), or None."""
    try:
        import torch.distributed as dist
    except ImportError as e:
        return f"torch is not installed ({e})"
    if not (dist.is_available() and dist.is_gloo_available()):
        return "this torch build has no torch.distributed gloo backend"
    return None
