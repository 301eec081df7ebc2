"""Run a Python command with the stand-in cupy and nvmath in place of the real ones: how the GPU
session's dry run executes its steps on the CPU.

    STANDIN_LIB=<built host kernels .so> python tests/support/standin_exec.py -m MODULE [ARGS...]
    STANDIN_LIB=... python tests/support/standin_exec.py -c CODE [ARGS...]

STANDIN_CUPY_VERSION sets the stand-in's ``cupy.__version__``; STANDIN_CAPTURE_FAILS=1 makes
every stream capture fail at its end, as a device that refuses capture would.
"""
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))    # tests/

from support import kernels_host, standin  # noqa: E402


def install():
    fake = standin.make_fake_cupy(kernels_host.load(os.environ["STANDIN_LIB"]))
    cp = fake.module
    cp.cuda.runtime.getDeviceCount = lambda: 1
    cp.cuda.runtime.runtimeGetVersion = lambda: 0
    if os.environ.get("STANDIN_CUPY_VERSION"):
        cp.__version__ = os.environ["STANDIN_CUPY_VERSION"]
    if os.environ.get("STANDIN_CAPTURE_FAILS") == "1":
        real_end = standin._FakeStream.end_capture

        def refuse(self):
            real_end(self)
            raise RuntimeError("cudaErrorStreamCaptureUnsupported (stand-in: STANDIN_CAPTURE_FAILS=1)")
        standin._FakeStream.end_capture = refuse
    sys.modules["cupy"] = cp
    sys.modules["cupy.cublas"] = cp.cublas
    sys.modules.update(standin.make_fake_nvmath(fake))
    return fake


def main():
    install()
    flag, target, *rest = sys.argv[1:]
    if flag == "-m":
        sys.argv = [target, *rest]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    elif flag == "-c":
        sys.argv = ["-c", *rest]
        exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})
    else:
        raise SystemExit(f"usage: {__doc__.splitlines()[3].strip()}")


if __name__ == "__main__":
    main()
