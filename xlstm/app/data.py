"""Corpus, vocabulary and batching for the language-model commands (``xlstm train``/``sample``).

The default corpus is the Python standard library's own source text, read at run time, so
training needs no download. Token ids are cut into ``batch`` contiguous streams and read in
windows of ``seq_len`` (truncated BPTT); the LSTM state is carried from one window to the next
and reset at each epoch, whose start is shifted by a seeded random offset so windows differ.
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import math
import os
import re
import sysconfig

import numpy as np

from ..errors import InputError

DEFAULT_MAX_CHARS = 1_000_000
MIN_SOURCE_CHARS = 10_000       # a folder with less .py source than this is not a standard library
LEVELS = ("char", "word")
UNK = "<unk>"
# words, runs of whitespace, single punctuation marks: "".join(tokens) gives the text back
_WORD_RE = re.compile(r"\w+|\s+|[^\w\s]")


def read_text(path: str, encoding: str = "utf-8", max_chars: int | None = None) -> str:
    """The text of ``path``; InputError for a missing, unreadable, undecodable or empty file."""
    if not os.path.exists(path):
        raise InputError(f"text file {path!r} does not exist; check the path given to --text")
    if os.path.isdir(path):
        raise InputError(f"--text {path!r} is a directory; give a text file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise InputError(f"cannot read text file {path!r}: {e.strerror or e}") from None
    if b"\0" in raw[:1 << 16] and not encoding.lower().replace("_", "-").startswith("utf-16") \
            and not encoding.lower().replace("_", "-").startswith("utf-32"):
        raise InputError(f"text file {path!r} looks like a binary file (it contains NUL bytes); "
                         "give a text file to --text")
    try:
        text = raw.decode(encoding)
    except LookupError:
        raise InputError(f"unknown encoding {encoding!r}; give a Python codec name to --encoding, "
                         "e.g. utf-8 or latin-1") from None
    except UnicodeDecodeError as e:
        raise InputError(f"text file {path!r} is not valid {encoding}: byte {raw[e.start:e.start + 1]!r} "
                         f"at offset {e.start} cannot be decoded ({e.reason}); if it is text in another "
                         "encoding, name it with --encoding (e.g. cp1252 or latin-1 for Western European text)") from None
    if max_chars:
        text = text[:max_chars]
    if not text.strip():
        raise InputError(f"text file {path!r} is empty (or only whitespace); give a file with some text")
    return text


def default_corpus(max_chars: int = DEFAULT_MAX_CHARS) -> tuple[str, str]:
    """(text, description): the standard library's top-level .py sources, sorted, the first
    ``max_chars`` characters.

    Every CPython installation has them, so the default run needs no download. Falls back to
    xlstm's own source where a stripped-down Python ships without (enough) .py files.
    """
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
        raise InputError(f"--max-chars must be a positive integer, got {max_chars!r}")
    for where in (sysconfig.get_paths().get("stdlib") or "", os.path.dirname(os.__file__),
                  os.path.dirname(os.path.abspath(__file__))):
        files = sorted(f for f in glob.glob(os.path.join(where, "*.py"))
                       if not os.path.basename(f).startswith("_"))
        parts, n = [], 0
        for f in files:
            try:
                with open(f, encoding="utf-8") as fh:
                    s = fh.read()
            except (OSError, UnicodeDecodeError):
                continue            # an odd file must not stop the default run
            parts.append(s)
            n += len(s)
            if n >= max(max_chars, MIN_SOURCE_CHARS):
                break
        if n >= MIN_SOURCE_CHARS:   # a real source folder (the cut to max_chars comes after)
            text = "".join(parts)[:max_chars]
            used = next(i + 1 for i, c in enumerate(itertools.accumulate(map(len, parts))) if c >= len(text))
            return text, f"Python source in {where} ({used} files, {len(text):,} characters)"
    raise InputError("no default corpus: this Python installation has no standard-library .py sources; "
                     "pass a text file with --text FILE")


def fingerprint(text: str) -> str:
    """SHA-256 of the text, so a resumed run can tell the corpus changed."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def tokenize(text: str, level: str) -> list[str]:
    """Characters (char level) or words, whitespace runs and punctuation (word level)."""
    if level == "char":
        return list(text)
    if level == "word":
        return _WORD_RE.findall(text)
    raise InputError(f"level must be one of {LEVELS}, got {level!r}")


class Vocab:
    """Token <-> id. Char level: every character of the corpus. Word level: the most frequent
    ``max_size - 1`` tokens plus ``<unk>``."""

    def __init__(self, tokens: list[str], level: str):
        if level not in LEVELS:
            raise InputError(f"level must be one of {LEVELS}, got {level!r}")
        self.level = level
        self.tokens = list(tokens)
        self.index = {t: i for i, t in enumerate(self.tokens)}
        if len(self.index) != len(self.tokens):
            raise InputError("vocabulary has repeated tokens; the checkpoint's vocabulary is damaged")

    @classmethod
    def build(cls, toks: list[str], level: str, max_size: int | None = None) -> "Vocab":
        if level == "char":
            return cls(sorted(set(toks)), level)
        counts: dict[str, int] = {}
        for t in toks:
            counts[t] = counts.get(t, 0) + 1
        # most frequent first, ties by the token itself so the order is reproducible
        ranked = sorted(counts, key=lambda t: (-counts[t], t))
        if max_size is not None and len(ranked) > max_size - 1:
            ranked = ranked[:max_size - 1]
        return cls([UNK] + [t for t in ranked if t != UNK], level)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, toks: list[str], strict: bool = False) -> np.ndarray:
        """Token ids (int64). Unknown tokens: <unk> at word level; at char level an InputError
        when ``strict`` (sampling) - a char model has no id for a character it never saw."""
        if self.level == "char" or strict:
            missing = sorted({t for t in toks if t not in self.index})
            if missing and (strict or UNK not in self.index):
                shown = "".join(missing[:20])
                raise InputError(f"{len(missing)} token(s) are not in the model's vocabulary: {shown!r}; "
                                 "use only characters/words from the training text")
        unk = self.index.get(UNK, 0)
        return np.fromiter((self.index.get(t, unk) for t in toks), dtype=np.int64, count=len(toks))

    def decode(self, ids) -> str:
        return "".join(self.tokens[int(i)] for i in ids)

    def to_json(self) -> dict:
        return {"level": self.level, "tokens": self.tokens}

    @classmethod
    def from_json(cls, d: dict) -> "Vocab":
        if not isinstance(d, dict) or not isinstance(d.get("tokens"), list) or d.get("level") not in LEVELS:
            raise InputError("the checkpoint's vocabulary is missing or malformed")
        return cls(d["tokens"], d["level"])


def unigram_entropy(ids: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats per token) of the corpus's unigram distribution: the loss of a model
    that knows only token frequencies, the baseline a language model must beat."""
    counts = np.bincount(ids, minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def split(ids: np.ndarray, val_fraction: float, seq_len: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, validation ids): the validation split is the end of the corpus."""
    n = len(ids)
    n_val = max(2, int(round(n * val_fraction)))
    need = batch * (seq_len + 1) + seq_len - 1
    if n - n_val < need:
        raise InputError(
            f"the corpus is too short: {n:,} tokens, of which {n - n_val:,} are for training, but one "
            f"training window of --batch {batch} x (--seq-len {seq_len} + 1) needs {need:,}; "
            "use a longer text, or a smaller --seq-len or --batch")
    return ids[:n - n_val], ids[n - n_val:]


class BatchStream:
    """Windows (x [T,B], y [T,B], reset) over ``batch`` contiguous streams of the training ids.

    y is x shifted by one token. ``reset`` is True for the first window of each epoch (the
    carried LSTM state must start from zeros). Each epoch starts at a random offset in
    [0, seq_len) drawn from a seeded generator; ``state_dict`` captures everything needed to
    continue with exactly the same windows.
    """

    def __init__(self, ids: np.ndarray, seq_len: int, batch: int, seed=None):
        self.ids, self.T, self.B = ids, int(seq_len), int(batch)
        self.L = (len(ids) - (self.T - 1)) // self.B         # stream length, for any offset
        self.windows_per_epoch = (self.L - 1) // self.T
        if self.windows_per_epoch < 1:
            raise InputError(f"the training text ({len(ids):,} tokens) is shorter than one window of "
                             f"--batch {batch} x --seq-len {seq_len}; use a longer text or smaller sizes")
        self.rng = np.random.default_rng(None if seed is None else [int(seed), 2])
        self.started, self.epoch, self.window, self.offset = False, 0, 0, 0
        self._streams = None

    def _start_epoch(self):
        self.started = True
        self.offset = int(self.rng.integers(0, self.T))
        self._streams = None

    def streams(self) -> np.ndarray:
        if self._streams is None:
            self._streams = self.ids[self.offset:self.offset + self.L * self.B].reshape(self.B, self.L)
        return self._streams

    def next(self):
        if not self.started:
            self._start_epoch()
        s, p = self.streams(), self.window * self.T
        x = np.ascontiguousarray(s[:, p:p + self.T].T)
        y = np.ascontiguousarray(s[:, p + 1:p + self.T + 1].T)
        reset = self.window == 0
        self.window += 1
        if self.window == self.windows_per_epoch:
            self.window, self.epoch = 0, self.epoch + 1
            self._start_epoch()
        return x, y, reset

    def state_dict(self) -> dict:
        return {"started": self.started, "epoch": self.epoch, "window": self.window,
                "offset": self.offset, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, d: dict) -> None:
        self.started = bool(d["started"])
        self.epoch, self.window, self.offset = int(d["epoch"]), int(d["window"]), int(d["offset"])
        self.rng.bit_generator.state = d["rng"]
        self._streams = None


def eval_streams(ids: np.ndarray, batch: int, max_tokens: int | None = None) -> np.ndarray:
    """Validation ids as [B, L] streams (B <= batch, L >= 2), capped at ``max_tokens``."""
    if max_tokens:
        ids = ids[:max_tokens]
    B = max(1, min(batch, len(ids) // 2))
    L = len(ids) // B
    if L < 2:
        raise InputError(f"the validation split has only {len(ids)} token(s); use a longer text "
                         "or a larger --val-fraction")
    return ids[:B * L].reshape(B, L)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
