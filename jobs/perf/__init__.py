"""Performance scripts: they print figures (``python -m jobs.perf.<name>``), built on public functions only.

    train              seconds per training step: Ray Train (streamed, materialised) vs a bare DeepSpeed loop
    preprocess         our Ray Data tiling vs transformers' processor: images/s, bytes, streaming memory
    padding            padding saved by modality-length grouping
    serve              the endpoint on both generation engines: req/s, tokens/s, latency, TTFT
    evaluate           batch inference (``jobs.evaluate``) on both generation engines: questions/s
    zero3_load         per-rank peak memory of a ZeRO-3 build, partitioned loading vs the whole model
    checkpoint_upload  training stall per checkpoint, background vs waited-for uploads
    datagen            ``jobs.generate_data`` against a teacher with a fixed service time, vs an ideal client
    gpu_smoke          on one GPU: the two stages of a ~0.5B model (``make gpu-smoke``)
    ranks              a helper, not a script: bare DeepSpeed ranks without Ray (``spawn_ranks``)

Each has ``--dry-run`` (set up, check, run nothing; the unit tests run it) and, but for ``gpu_smoke``,
``--quick`` (the real measurement at tiny sizes; ``make chaos`` runs it and parses its last line, which
is the format the README quotes). (Not to be confused with ``llava_platform.benchmarks``: the LLaVA-1.5
evaluation benchmarks.)
"""
