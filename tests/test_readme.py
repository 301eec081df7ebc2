"""The README's runnable Python examples (blocks that start with an import) run as written, and its
figures of the main job and the command line are the last output of benchmarks/readme_figures.py."""
import json
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if b.startswith("import")]


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_example_runs(i):
    scope = {}
    exec(compile(BLOCKS[i], f"README.md block {i}", "exec"), scope)
    if "loss" in scope:                   # the language-model example must actually learn
        assert scope["loss"] < 1.0


# -- the figures: benchmarks/readme_figures.py's last output, stated by the README ---------------------
FIGURES = json.loads((README.parent / "benchmarks" / "results" / "readme-figures.json").read_text())
TEXT = " ".join(README.read_text().split())       # whitespace-normalised: line breaks do not matter


def _below(loss, unigram):
    return f"{100 * (1 - loss / unigram):.1f}% below it"


def test_the_quick_start_figures_are_the_scripts_last_output():
    q, m = FIGURES["quickstart"], FIGURES["quickstart"]["machine"]
    assert f"done: {q['steps']} steps in {q['seconds']:.1f} s" in q["stdout"]      # what the run printed
    for want in (f"{q['steps']} steps in {q['seconds']:.1f} s", f"({q['wall_s']:.1f} s wall",
                 f"{q['peak_rss_bytes'] / 1e9:.2f} GB peak RSS", f"validation loss {q['val_loss']:.4f} nats/char",
                 f"unigram entropy of {q['unigram_entropy']:.3f} nats/char",
                 f"({_below(q['val_loss'], q['unigram_entropy'])})", f"commit {m['commit'][:10]}",
                 m["date"][:10], f"{m['cores']}-core {m['cpu']}, Python {m['python']}"):
        assert want in TEXT, want


def test_the_precision_table_is_the_scripts_last_output():
    rows = FIGURES["precision"]["val_loss"]
    f800 = rows["float32"]["800"]
    for mode, label in (("float32", "float32"), ("tf32", "tf32 (emulated)"), ("bf16", "bf16 (emulated)")):
        r = rows[mode]
        rel = "" if mode == "float32" else f"{100 * (r['800'] / f800 - 1):+.2f}%"
        line = f"| {label} | " + " | ".join(f"{r[s]:.4f}" for s in ("100", "200", "400", "600", "800")) + f" | {rel} |"
        assert " ".join(line.split()) in TEXT, line
    assert f"commit {FIGURES['precision']['machine']['commit'][:10]}" in TEXT


def test_the_nproc_timing_is_the_scripts_last_output():
    runs = FIGURES["nproc"]["runs"]
    for n, label in (("1", "1 process"), ("2", "2 gloo processes")):
        tok = " and ".join(f"{r['tokens_per_s']:,}" for r in runs[n])
        wall = ", ".join(f"{r['wall_s']:.1f}" for r in runs[n])
        want = f"{label}: {tok} tokens/s ({wall} s wall)"
        assert want in TEXT, want
    assert f"commit {FIGURES['nproc']['machine']['commit'][:10]}" in TEXT


def test_the_trace_sample_is_what_xlstm_trace_prints():
    block = re.search(r"```\n\$ xlstm trace[^\n]*\n(.*?)```", README.read_text(), re.S).group(1)
    shown = [line for line in block.splitlines() if line.strip() != "..."]
    printed = FIGURES["trace"]["stdout"].splitlines()
    at = 0
    for line in shown:          # every line shown, in the order printed
        assert line in printed[at:], line
        at = printed.index(line, at) + 1
    # and the command still prints them (the trace is deterministic; the fast path's difference
    # from the reference cell depends on the BLAS in its last bits, so that line is left out)
    from xlstm.trace_example import example
    now = str(example()[1]).splitlines()
    for line in shown:
        if "max scaled difference" not in line:
            assert line in now, line
