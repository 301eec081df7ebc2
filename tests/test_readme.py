"""The README's runnable Python examples (blocks that start with an import) run as written."""
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
