"""Corpus reading, vocabulary and batching (xlstm/app/data.py)."""
import math

import numpy as np
import pytest

from xlstm.app import data
from xlstm.errors import InputError


def test_default_corpus_needs_no_download_and_is_capped():
    text, desc = data.default_corpus(50_000)
    assert len(text) == 50_000
    assert "def " in text and "Python source" in desc


def test_read_text_errors_say_what_and_how(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        data.read_text(str(tmp_path / "nope.txt"))
    with pytest.raises(InputError, match="is a directory"):
        data.read_text(str(tmp_path))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(InputError, match="is empty"):
        data.read_text(str(tmp_path / "empty.txt"))
    (tmp_path / "latin.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(InputError, match=r"not valid utf-8.*offset 3.*--encoding"):
        data.read_text(str(tmp_path / "latin.txt"))
    assert data.read_text(str(tmp_path / "latin.txt"), "latin-1") == "café crème"
    with pytest.raises(InputError, match="unknown encoding"):
        data.read_text(str(tmp_path / "latin.txt"), "no-such-codec")


def test_word_tokens_join_back_to_the_text():
    text = "def f(x):\n    return x+1  # one\n"
    toks = data.tokenize(text, "word")
    assert "".join(toks) == text
    assert "return" in toks and "\n    " in toks and "(" in toks


def test_vocab_char_and_word():
    v = data.Vocab.build(list("abcab"), "char")
    assert v.tokens == ["a", "b", "c"]
    assert v.decode(v.encode(list("cab"))) == "cab"
    with pytest.raises(InputError, match="not in the model's vocabulary: 'z'"):
        v.encode(list("az"))
    w = data.Vocab.build(["x", "y", "x", "z", "x", "y"], "word", max_size=3)
    assert w.tokens == [data.UNK, "x", "y"]
    assert list(w.encode(["x", "z"])) == [1, 0]            # unknown word -> <unk>
    with pytest.raises(InputError, match="not in the model's vocabulary"):
        w.encode(["z"], strict=True)
    assert data.Vocab.from_json(w.to_json()).tokens == w.tokens


def test_unigram_entropy():
    assert data.unigram_entropy(np.array([0, 1, 2, 3]), 4) == pytest.approx(math.log(4))
    assert data.unigram_entropy(np.array([1, 1, 1]), 3) == pytest.approx(0.0)


def test_split_refuses_a_corpus_shorter_than_one_window():
    with pytest.raises(InputError, match=r"too short.*--seq-len"):
        data.split(np.arange(100), 0.1, seq_len=32, batch=4)
    tr, va = data.split(np.arange(1000), 0.1, seq_len=8, batch=4)
    assert len(tr) == 900 and len(va) == 100 and va[0] == 900


def test_batch_stream_targets_are_inputs_shifted_and_epochs_reset():
    ids = np.arange(200)
    s = data.BatchStream(ids, seq_len=5, batch=3, seed=0)
    x, y, reset = s.next()
    assert x.shape == (5, 3) and reset
    np.testing.assert_array_equal(y[:-1], x[1:])
    np.testing.assert_array_equal(y, x + 1)                 # ids are consecutive integers here
    resets = [s.next()[2] for _ in range(3 * s.windows_per_epoch)]
    assert sum(resets) == 3 and s.epoch == 3


def test_batch_stream_state_dict_continues_exactly():
    ids = np.random.default_rng(0).integers(0, 50, 500)
    a = data.BatchStream(ids, 7, 4, seed=3)
    for _ in range(23):
        a.next()
    b = data.BatchStream(ids, 7, 4, seed=99)
    b.load_state_dict(a.state_dict())
    for _ in range(40):
        xa, ya, ra = a.next()
        xb, yb, rb = b.next()
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
        assert ra == rb


def test_eval_streams():
    v = data.eval_streams(np.arange(1000), 8, max_tokens=400)
    assert v.shape == (8, 50)
    with pytest.raises(InputError, match="validation split"):
        data.eval_streams(np.arange(1), 8)
