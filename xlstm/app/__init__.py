"""The ``xlstm`` command and what it runs: training, data, checkpoints, sampling, data-parallel runs."""
