"""Ray job entrypoints: ``python -m jobs.<name> ...``, locally or via ``ray job submit``.

Each job has ``run(...)`` returning a typed result, and ``main(argv)`` that only parses arguments and
calls ``run``; ``jobs.pipeline`` chains the ``run`` functions. See jobs/README.md.
"""
