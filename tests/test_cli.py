"""The command line: `xlstm --version`, `xlstm info`, `xlstm gradcheck`, exit codes."""
import subprocess
import sys

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
