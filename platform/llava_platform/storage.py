"""Paths that are local folders or ``s3://`` URIs, read through pyarrow's filesystems; which URIs are remote.

Shared by the data pipeline, training (checkpoint storage) and serving (checkpoint downloads).

S3-compatible stores (MinIO, moto, Ceph) work through an endpoint override: the recipe's
``data.s3_endpoint_url`` or the standard ``AWS_ENDPOINT_URL`` variable. Credentials come from the
usual AWS environment variables, never from recipes. pyarrow is imported where a filesystem is made:
telling local from remote needs nothing (the GPU smoke test's Python has no pyarrow).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:
    import pyarrow.fs as pafs

S3_MAX_ATTEMPTS = 10
"""Attempts per S3 request (throttling, 5xx, dropped connections), with the AWS SDK's backoff; pyarrow's
default of 3 gives up on a checkpoint upload during a short throttling burst."""


MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
"""URI schemes that MLflow resolves (``mlflow.artifacts.download_artifacts``; see ``registry.py``)."""


def is_mlflow_uri(uri: str | None) -> bool:
    """Whether ``uri`` names an MLflow artifact or registered model (``models:/``, ``runs:/``, ...)."""
    return bool(uri) and uri.startswith(MLFLOW_SCHEMES)


def is_remote(uri: str) -> bool:
    """Whether ``uri`` names something other than a local path (``s3://``, ``gs://``, ``runs:/``, ...).

    The one test of local vs remote: local paths are checked on the driver before any work starts;
    remote ones are left to the filesystem or MLflow that reads them.
    """
    return "://" in uri or is_mlflow_uri(uri)


def filesystem_for(uri: str, s3_endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """The filesystem that holds ``uri`` and the path inside it (no scheme)."""
    import pyarrow.fs as pafs

    if uri.startswith("s3://"):
        endpoint = s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        kwargs = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                  "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS)}
        if endpoint:
            parsed = urlparse(endpoint)
            kwargs.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
        return pafs.S3FileSystem(**kwargs), uri.removeprefix("s3://")
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def read_bytes(uri: str, s3_endpoint_url: str | None = None) -> bytes:
    """A whole file, local or ``s3://``.

    Raises:
        FileNotFoundError: it does not exist.
    """
    filesystem, path = filesystem_for(uri, s3_endpoint_url)
    with filesystem.open_input_stream(path) as stream:
        return stream.readall()


def join(root: str, relative: str) -> str:
    """``root`` + ``relative`` for folders and ``s3://`` prefixes alike."""
    return f"{root.rstrip('/')}/{relative.lstrip('/')}"


def files_signature(folder: str | Path, pattern: str = "*") -> str:
    """A short hash of the files under a local ``folder`` that match ``pattern``: their relative names, sizes and
    modification times (not their bytes: cheap for a 100 GB checkpoint). A file rewritten in place gets another
    signature, so caches keyed by it are never served stale contents. A remote URI signs as its name."""
    import hashlib

    root = Path(folder)
    if not root.is_dir():
        return hashlib.sha1(str(folder).encode()).hexdigest()[:16]
    files = sorted((str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns) for f in root.rglob(pattern)
                   if f.is_file())
    return hashlib.sha1(f"{root.resolve()}|{files}".encode()).hexdigest()[:16]
