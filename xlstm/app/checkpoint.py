"""Checkpoints that never lose work: atomic, verified, pickle-free.

A run directory holds::

    OUT/ckpt-000200/arrays.npz   every array (parameters, optimiser moments, carried LSTM state)
    OUT/ckpt-000200/meta.json    config, vocabulary, step, RNG states, and the SHA-256 of arrays.npz
    OUT/latest                   the name of the newest checkpoint

A checkpoint is written into ``OUT/ckpt.tmp-XXXX/``, each file fsynced, then renamed to its
final name in one ``os.replace``: a crash or a full disk mid-save leaves only a stray temporary
folder, never a half-written checkpoint, and the previous checkpoints stay as they were.
Loading checks the SHA-256 and reads the arrays with ``allow_pickle=False``; ``load_model``
turns the newest good checkpoint back into the trained model and its vocabulary (``xlstm.load``).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from typing import NamedTuple

import numpy as np

from ..errors import InputError

FORMAT = "xlstm-checkpoint"
VERSION = 1
ARRAYS, META, LATEST = "arrays.npz", "meta.json", "latest"
_NAME = re.compile(r"^ckpt-(\d+)$")


class CheckpointError(InputError):
    """A checkpoint is missing, corrupted, or from an incompatible config. ``why``: the short reason."""

    def __init__(self, message: str, why: str | None = None):
        super().__init__(message)
        self.why = why or message


def _fsync_dir(path: str) -> None:
    """Make a rename inside ``path`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsynced temporary file in the same folder and a rename.

    The file gets the permissions of any other file the user creates (0666 less the umask), not
    the temporary file's private 0600, so every file of a run reads the same.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def checkpoint_step(path: str) -> int | None:
    m = _NAME.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: str) -> list[str]:
    """Checkpoint folders of a run, newest (highest step) first."""
    try:
        names = os.listdir(run_dir)
    except OSError:
        return []
    found = [(checkpoint_step(n), n) for n in names if _NAME.match(n) and os.path.isdir(os.path.join(run_dir, n))]
    return [os.path.join(run_dir, n) for _, n in sorted(found, reverse=True)]


def save(run_dir: str, step: int, arrays: dict, meta: dict, keep: int = 3) -> str:
    """Save checkpoint ``ckpt-<step>`` in ``run_dir`` atomically; keep the newest ``keep``; return its path."""
    os.makedirs(run_dir, exist_ok=True)
    name = f"ckpt-{step:06d}"
    final = os.path.join(run_dir, name)
    if os.path.isdir(final):
        try:
            load(final)
            # the same step was saved already (e.g. a periodic save, then Ctrl-C): training is
            # deterministic, so that checkpoint holds this very state
            _write_latest(run_dir, name)
            return final
        except CheckpointError:
            shutil.rmtree(final, ignore_errors=True)   # a damaged copy of this step: replace it
    for stale in os.listdir(run_dir):                  # left by an earlier crash mid-save
        if stale.startswith("ckpt.tmp-"):
            shutil.rmtree(os.path.join(run_dir, stale), ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix="ckpt.tmp-", dir=run_dir)
    try:
        os.chmod(tmp, 0o777 & ~_umask())   # mkdtemp's 0700 would hide the checkpoint from others
        apath = os.path.join(tmp, ARRAYS)
        with open(apath, "wb") as f:
            np.savez(f, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})
            f.flush()
            os.fsync(f.fileno())
        manifest = {"format": FORMAT, "version": VERSION, "step": int(step),
                    "arrays_sha256": _sha256_file(apath),
                    "arrays": {k: {"shape": list(np.shape(v)), "dtype": np.asarray(v).dtype.str}
                               for k, v in arrays.items()},
                    **meta}
        with open(os.path.join(tmp, META), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        os.replace(tmp, final)          # the checkpoint appears complete, or not at all
        _fsync_dir(run_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = list_checkpoints(run_dir)
        raise CheckpointError(f"could not save checkpoint {final}: {e.strerror or e}; "
                              + (f"the previous checkpoint {prev[0]} is intact" if prev else "no checkpoint was written")
                              + "; free some disk space or choose another --out") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_latest(run_dir, name)
    _prune(run_dir, keep, protect=final)
    return final


def _write_latest(run_dir: str, name: str) -> None:
    write_atomic(os.path.join(run_dir, LATEST), (name + "\n").encode())


def _prune(run_dir: str, keep: int, protect: str) -> None:
    for old in list_checkpoints(run_dir)[max(1, keep):]:
        if os.path.abspath(old) != os.path.abspath(protect):
            shutil.rmtree(old, ignore_errors=True)


def _corrupt(path: str, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint file {path} is corrupted ({why}); it cannot be loaded. "
                           "Use an earlier checkpoint (another ckpt-* folder of the same run), "
                           "or give the run folder to fall back to the newest good one",
                           why=f"{os.path.basename(path)} is corrupted: {why}")


def load(path: str) -> tuple[dict, dict]:
    """(arrays, meta) of the checkpoint folder ``path``, verified; CheckpointError when damaged."""
    mpath, apath = os.path.join(path, META), os.path.join(path, ARRAYS)
    if not os.path.isfile(mpath):
        raise CheckpointError(f"{path} is not an xlstm checkpoint (no {META}); give a ckpt-* folder or a "
                              "run folder written by `xlstm train`")
    try:
        with open(mpath, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise _corrupt(mpath, f"not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _corrupt(mpath, f"it does not describe an {FORMAT}")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {meta.get('version')!r}; this xlstm "
                              f"reads version {VERSION}; use the xlstm version that wrote it")
    if not os.path.isfile(apath):
        raise CheckpointError(f"checkpoint file {apath} is missing; the checkpoint {path} is incomplete")
    with open(apath, "rb") as f:
        raw = f.read()
    if hashlib.sha256(raw).hexdigest() != meta.get("arrays_sha256"):
        raise _corrupt(apath, "its SHA-256 does not match the one recorded in meta.json")
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:      # any damage the hash missed (a doctored manifest) must still be a clear error
        raise _corrupt(apath, f"unreadable: {e}") from None
    want = meta.get("arrays") or {}
    if set(want) != set(arrays) or any(list(arrays[k].shape) != want[k]["shape"] for k in want):
        raise _corrupt(apath, "its arrays do not match the list in meta.json")
    return arrays, meta


def candidates(path: str) -> tuple[list[str], bool]:
    """(checkpoint folders to try, newest first; True when ``path`` named one checkpoint)."""
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path!r}: it does not exist")
    if os.path.isfile(path) and os.path.basename(path) in (META, ARRAYS):
        path = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(os.path.join(path, META)) or checkpoint_step(path) is not None:
        return [path], True
    found = list_checkpoints(path)
    try:
        with open(os.path.join(path, LATEST), encoding="utf-8") as f:
            latest = os.path.join(path, f.read().strip())
        if latest in found:     # the pointer wins: it names the last checkpoint fully written
            found.remove(latest)
            found.insert(0, latest)
    except (OSError, UnicodeDecodeError):
        pass
    if not found:
        raise CheckpointError(f"no checkpoint in {path!r}: expected ckpt-* folders written by `xlstm train`")
    return found, False


def load_latest(path: str, warn=print) -> tuple[str, dict, dict]:
    """(folder, arrays, meta) of the newest good checkpoint at ``path``.

    ``path`` is a checkpoint folder (loaded strictly) or a run folder: there a damaged newest
    checkpoint is reported through ``warn`` and the next older one is tried.
    """
    found, single = candidates(path)
    errors = []
    for c in found:
        try:
            arrays, meta = load(c)
        except CheckpointError as e:
            if single:
                raise
            errors.append(f"{os.path.basename(c)}: {e.why}")
            warn(f"warning: skipping {c}: {e.why}")
            continue
        return c, arrays, meta
    shown = "; ".join(errors[:3]) + (f"; and {len(errors) - 3} more" if len(errors) > 3 else "")
    raise CheckpointError(f"no usable checkpoint in {path}: all {len(errors)} are damaged ({shown}); "
                          "nothing of this run can be loaded: start a new run (another --out)")


class Run(NamedTuple):
    """A trained run, loaded: ``model`` (Embedding -> LSTM -> Dense, in eval mode), its
    ``vocab`` (``vocab.encode(tokens)``, ``vocab.decode(ids)``, ``vocab.tokens``, ``vocab.level``:
    "char" or "word"), ``meta`` (config, step, losses: the checkpoint's meta.json) and the
    checkpoint ``folder`` it came from."""

    model: object
    vocab: object
    meta: dict
    folder: str


def load_model(path: str, backend=None, warn=print) -> Run:
    """The newest good checkpoint at ``path`` (a run folder or one ckpt-* folder) as a model on
    ``backend`` (None: the current one), with its vocabulary; ``xlstm.load`` is this."""
    from .. import backends
    from . import data, model as lm

    backend = backends.resolve(backend)        # an unusable --backend cupy is reported first
    folder, arrays, meta = load_latest(path, warn=warn)
    vocab = data.Vocab.from_json(meta.get("vocab"))
    cfg = dict(lm.DEFAULTS)
    cfg.update(meta.get("config") or {})
    try:
        model = lm.build_model(cfg, len(vocab), backend)
        model.load_state_dict({k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")})
    except InputError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {folder} does not fit its own config "
                              f"(incompatible or damaged): {e}") from None
    return Run(model.eval(), vocab, meta, folder)


def new_run_dir(kind: str) -> str:
    """runs/<kind>-NNN under the current directory, the first that does not exist yet (a run
    never writes over an earlier one, nor beside a clone's committed results)."""
    for i in range(1, 10_000):
        d = os.path.join("runs", f"{kind}-{i:03d}")
        if not os.path.exists(d):
            return d
    raise InputError(f"runs/ has 9999 {kind} runs; pass --out DIR")
