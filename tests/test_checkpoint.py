"""Atomic, verified checkpoints (xlstm/app/checkpoint.py)."""
import errno
import hashlib
import io
import json
import os

import numpy as np
import pytest

from xlstm.app import checkpoint
from xlstm.app.checkpoint import CheckpointError


def _arrays(v=1.0):
    return {"param/0.E": np.full((3, 2), v, np.float32), "carry/h": np.arange(4.0)}


def test_round_trip_and_latest_pointer(tmp_path):
    run = str(tmp_path / "run")
    p = checkpoint.save(run, 5, _arrays(), {"config": {"hidden": 3}})
    assert os.path.basename(p) == "ckpt-000005"
    arrays, meta = checkpoint.load(p)
    np.testing.assert_array_equal(arrays["param/0.E"], _arrays()["param/0.E"])
    assert arrays["param/0.E"].dtype == np.float32
    assert meta["step"] == 5 and meta["config"] == {"hidden": 3}
    checkpoint.save(run, 10, _arrays(2.0), {})
    assert open(os.path.join(run, "latest")).read().strip() == "ckpt-000010"
    folder, arrays, _ = checkpoint.load_latest(run)
    assert folder.endswith("ckpt-000010") and arrays["param/0.E"][0, 0] == 2.0


def test_keep_prunes_old_checkpoints(tmp_path):
    run = str(tmp_path)
    for s in (1, 2, 3, 4):
        checkpoint.save(run, s, _arrays(s), {}, keep=2)
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(run)] == ["ckpt-000004", "ckpt-000003"]


def test_full_disk_mid_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    run = str(tmp_path)
    good = checkpoint.save(run, 1, _arrays(1.0), {})

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint.os, "fsync", disk_full)
    with pytest.raises(CheckpointError, match=r"No space left.*ckpt-000001 is intact"):
        checkpoint.save(run, 2, _arrays(2.0), {})
    monkeypatch.undo()
    assert sorted(os.listdir(run)) == ["ckpt-000001", "latest"]      # no half-written folder
    folder, arrays, _ = checkpoint.load_latest(run)
    assert folder == good and arrays["param/0.E"][0, 0] == 1.0


def test_crash_mid_save_leaves_no_checkpoint_and_is_cleaned_up(tmp_path, monkeypatch):
    run = str(tmp_path)
    checkpoint.save(run, 1, _arrays(), {})
    monkeypatch.setattr(checkpoint.json, "dump", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(run, 2, _arrays(), {})
    monkeypatch.undo()
    assert sorted(os.listdir(run)) == ["ckpt-000001", "latest"]
    checkpoint.save(run, 3, _arrays(), {})
    assert not [n for n in os.listdir(run) if n.startswith("ckpt.tmp-")]


def _flip_byte(path, at=-200):
    raw = bytearray(open(path, "rb").read())
    raw[at] ^= 0xFF
    open(path, "wb").write(bytes(raw))


def test_corrupted_checkpoint_is_refused_naming_the_file_and_the_previous_still_loads(tmp_path):
    run = str(tmp_path)
    checkpoint.save(run, 1, _arrays(1.0), {})
    newest = checkpoint.save(run, 2, _arrays(2.0), {})
    bad = os.path.join(newest, "arrays.npz")
    _flip_byte(bad)
    with pytest.raises(CheckpointError, match=f"{bad}.*corrupted.*SHA-256"):
        checkpoint.load(newest)
    warnings = []
    folder, arrays, _ = checkpoint.load_latest(run, warn=warnings.append)
    assert folder.endswith("ckpt-000001") and arrays["param/0.E"][0, 0] == 1.0
    assert "ckpt-000002" in warnings[0] and "corrupted" in warnings[0]
    with pytest.raises(CheckpointError, match="corrupted"):          # one folder named: strict
        checkpoint.load_latest(newest)


def test_damaged_manifest_version_and_missing_files(tmp_path):
    run = str(tmp_path)
    p = checkpoint.save(run, 1, _arrays(), {})
    mpath = os.path.join(p, "meta.json")
    meta = json.load(open(mpath))
    open(mpath, "w").write("{not json")
    with pytest.raises(CheckpointError, match="meta.json is corrupted"):
        checkpoint.load(p)
    meta["version"] = 99
    open(mpath, "w").write(json.dumps(meta))
    with pytest.raises(CheckpointError, match="version 99"):
        checkpoint.load(p)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load_latest(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        checkpoint.load_latest(str(tmp_path / "empty"))
    os.remove(os.path.join(p, "arrays.npz"))
    meta["version"] = checkpoint.VERSION
    open(mpath, "w").write(json.dumps(meta))
    with pytest.raises(CheckpointError, match="missing"):
        checkpoint.load(p)


def test_arrays_are_read_without_pickle(tmp_path):
    run = str(tmp_path)
    p = checkpoint.save(run, 1, _arrays(), {})
    # an object array smuggled in (with a matching hash) is refused, not unpickled
    buf = io.BytesIO()
    np.savez(buf, **{"param/0.E": np.array([{"a": 1}], dtype=object), "carry/h": np.arange(4.0)})
    open(os.path.join(p, "arrays.npz"), "wb").write(buf.getvalue())
    mpath = os.path.join(p, "meta.json")
    meta = json.load(open(mpath))
    meta["arrays_sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    open(mpath, "w").write(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unreadable"):
        checkpoint.load(p)


def test_checkpoint_arrays_are_snapshots_of_the_training_state():
    """What train saves (parameters, Adam's buffers, the carried LSTM state) owns its memory:
    a step taken while the checkpoint is being written cannot change it (on NumPy ``to_numpy``
    is the live buffer)."""
    from xlstm.app import train
    from xlstm.losses import cross_entropy
    from xlstm.optim import Adam

    cfg = dict(train.DEFAULTS, hidden=6, embed=3, seed=0, dtype="float64")
    model = train.build_model(cfg, 5, "numpy")
    opt = Adam(model, lr=0.1)
    ids = np.random.default_rng(0).integers(0, 5, (4, 2))

    def step():
        model.zero_grad()
        logits = model.forward(ids, state=model.last_state)
        model.backward(cross_entropy(logits, ids)[1])
        opt.step()
        return model.last_state

    carry = step()
    arrays = train._state_arrays(model, opt, carry)
    live = list(model.params.values()) + list(model.grads.values()) + list(carry)
    live += [a for st in opt.state.values() for a in st.values()]
    for k, v in arrays.items():
        assert not any(np.shares_memory(v, a) for a in live), k
