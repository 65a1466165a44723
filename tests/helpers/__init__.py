"""Test facilities: tiny models, real servers (MLflow, moto S3, a Ray head node), test data, fault
scenarios and the pytest plugins that print the reliability table and the time per layer.

Imported normally (``from tests.helpers.servers import MlflowServer``); the fixtures in
``fixtures.py`` reach every test through ``tests/conftest.py``.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
