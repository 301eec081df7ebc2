"""The command line: `xlstm --version`, `xlstm info`, `xlstm gradcheck`, exit codes."""
import subprocess
import sys

import pytest

import xlstm


def _run(*args):
    return subprocess.run([sys.executable, "-m", "xlstm", *args], capture_output=True, text=True, timeout=120)


def test_version():
    out = _run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"xlstm {xlstm.__version__}"


def test_info_lists_backends_and_why_not():
    out = _run("info")
    assert out.returncode == 0
    assert "numpy  available" in out.stdout
    reason = xlstm.backends.cupy_unavailable_reason()
    if reason is None:
        assert "cupy   available" in out.stdout
    else:
        assert "cupy   unavailable: " + reason in out.stdout


def test_gradcheck_command_passes():
    out = _run("gradcheck", "--layers", "2", "--bidirectional")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "l1_reverse.U" in out.stdout and "FAIL" not in out.stdout


def test_no_command_prints_help_and_exits_2():
    out = _run()
    assert out.returncode == 2 and "COMMAND" in out.stdout


def test_the_distribution_has_a_name_of_its_own_and_every_install_hint_uses_it():
    # "xlstm" on the package index is NX-AI's Extended LSTM: a hint `pip install 'xlstm[...]'`
    # would install someone else's code
    import pathlib
    import re
    tomllib = pytest.importorskip("tomllib")
    root = pathlib.Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["name"] == "xlstm-bptt"
    assert project["scripts"] == {"xlstm": "xlstm.app.cli:main"}
    assert {"train", "torch", "distributed", "plot", "test", "cuda12", "cuda13"} <= set(project["optional-dependencies"])
    hints = [(str(p.relative_to(root)), m) for p in (root / "xlstm").rglob("*.py")
             for m in re.findall(r"""['"`]xlstm\[""", p.read_text())]     # also where a hint is split over lines
    assert not hints, hints
    readme = (root / "README.md").read_text()
    assert "xlstm-bptt" in readme and "NX-AI" in readme
