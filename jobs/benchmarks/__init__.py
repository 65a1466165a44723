"""Benchmarks: scripts that print figures (``python -m jobs.benchmarks.<name>``), built on public functions only.

    train       seconds per training step: Ray Train (streamed, materialised) vs a bare DeepSpeed loop
    preprocess  our Ray Data tiling vs transformers' processor: rows/s and peak memory
    padding     padding saved by modality-length grouping
    serve       the endpoint's throughput and latency, batched vs unbatched

Each has ``--dry-run`` (set up, check, run nothing), which the test suite runs; figures go in the README.
"""
