"""The benchmark suite: ``python -m benchmarks`` (= ``xlstm bench``) and ``pytest benchmarks/``."""
