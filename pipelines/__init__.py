"""Ray Data pipelines: read LLaVA-format data, decode, tile and tokenise into Arrow batches.

Built on the core library's pure functions (``llava_platform.data``): ``sources`` reads records,
``preprocess`` maps them to training rows with a quarantine, ``shards`` stores rows as Parquet with a
manifest, ``evaluate`` answers questions with a model actor pool. See pipelines/README.md.
"""
