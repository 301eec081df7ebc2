"""``python -m benchmarks [options]``: the same as ``xlstm bench [options]`` (see ``xlstm/bench/``)."""
import sys

from xlstm.bench import main

if __name__ == "__main__":
    sys.exit(main())
