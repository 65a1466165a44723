"""Test facilities shipped with the product: stand-ins for the services it talks to, on 127.0.0.1.

- ``local_servers.py``: moto's S3 server (``MotoServer``), ``free_port``, ``wait_for_http``, ``S3_TEST_ENV``;
- ``flaky_s3.py``: ``FlakyS3Proxy``, a loopback proxy in front of S3 that throttles or delays requests;
- ``chat_server.py``: ``ChatServer``, a scripted OpenAI-protocol teacher with faults by caption.

The test suite and the benchmark scripts (``jobs/perf/``) both use them; nothing here is imported by
the rest of the core. They need the ``test`` extra (moto) at run time.
"""
