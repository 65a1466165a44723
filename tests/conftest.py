"""The test tree mirrors the code: ``unit/`` (no Ray), ``integration/`` (one Ray head node, real
``mlflow server``, moto S3, Serve over HTTP, Ray Train runs, submitted jobs), ``chaos/`` (the slow
multi-node fault scenarios of ``make chaos``). Helpers and fixtures live in ``tests/helpers/``."""

from tests.helpers.ray_head import use_token_auth

use_token_auth()  # before any test module imports ray: Ray reads its auth settings when first imported

pytest_plugins = ["tests.helpers.report", "tests.helpers.fixtures"]
