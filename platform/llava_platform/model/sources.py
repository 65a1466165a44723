"""Where a checkpoint to serve or evaluate comes from: a local folder, an ``s3://`` prefix, or MLflow.

Every source ends as a local folder in the Hugging Face layout (``config.json`` + weights +
processor files), which ``load_pretrained_llava`` loads: our exports and any llava-hf checkpoint alike.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from filelock import FileLock

from llava_platform.storage import filesystem_for, is_mlflow_uri, is_remote

CHECKPOINT_ARTIFACT = "checkpoint"
"""The registered pyfunc model's artifact that holds the Hugging Face folder (``registry.register_export``)."""


class CheckpointSourceError(ValueError):
    """A model URI that does not lead to a Hugging Face checkpoint folder."""


def resolve_checkpoint(uri: str, cache_dir: str | Path, *, tracking_uri: str | None = None,
                       s3_endpoint_url: str | None = None) -> Path:
    """A local Hugging Face folder for ``uri``, downloading it into ``cache_dir`` if it is remote.

    Args:
        uri: a folder, ``s3://bucket/prefix``, ``models:/<name>/<version or alias>``, or ``runs:/<id>/<path>``.
        cache_dir: where remote checkpoints are downloaded (one sub-folder per URI).
        tracking_uri: MLflow tracking URI for ``models:/`` and ``runs:/`` (default: MLflow's own).
        s3_endpoint_url: S3-compatible endpoint (default: ``AWS_ENDPOINT_URL``).

    Raises:
        CheckpointSourceError: the source does not exist or holds no ``config.json``.
    """
    if not is_remote(uri):
        return _checked(Path(uri), uri)
    target = Path(cache_dir) / hashlib.sha256(uri.encode()).hexdigest()[:16]
    target.parent.mkdir(parents=True, exist_ok=True)
    # Replicas that start together on one node share the cache: one downloads, the others wait and reuse.
    with FileLock(f"{target}.lock"):
        return _checked(_download(uri, target, tracking_uri, s3_endpoint_url), uri)


def _download(uri: str, target: Path, tracking_uri: str | None, s3_endpoint_url: str | None) -> Path:
    if is_mlflow_uri(uri):
        import mlflow.artifacts

        try:
            source = _registered_source(uri, tracking_uri) if uri.startswith("models:/") else uri
            folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(target),
                                                              tracking_uri=tracking_uri))
        except Exception as error:  # MLflow raises several types for "not found"
            raise CheckpointSourceError(f"cannot download {uri} from MLflow: {error}") from error
        return _pyfunc_checkpoint(folder) or folder
    return _download_s3(uri, target, s3_endpoint_url)


def _checked(folder: Path, uri: str) -> Path:
    if not (folder / "config.json").is_file():
        raise CheckpointSourceError(f"{uri}: no config.json in {folder}; give a Hugging Face checkpoint folder "
                                    "(an export of jobs.train, or a llava-hf model)")
    return folder


def _registered_source(uri: str, tracking_uri: str | None) -> str:
    """``models:/<name>/<version>`` or ``models:/<name>@<alias>`` -> the version's artifact URI."""
    client, version = _registered_version(uri, tracking_uri)
    return client.get_model_version_download_uri(version.name, version.version)


def _registered_version(uri: str, tracking_uri: str | None):
    """The MLflow client and ``ModelVersion`` of a ``models:/`` URI, looked up with an explicit registry URI
    (not MLflow's process-global one)."""
    import mlflow
    from mlflow import MlflowClient

    registry = tracking_uri or mlflow.get_tracking_uri()
    client = MlflowClient(tracking_uri=registry, registry_uri=registry)
    name, _, version = uri.removeprefix("models:/").partition("/")
    if "@" in name:
        name, version = name.split("@", 1)
    if version.isdigit():
        return client, client.get_model_version(name, version)
    return client, client.get_model_version_by_alias(name, version)  # models:/<name>@<alias> or /<alias>


def source_run_id(uri: str, tracking_uri: str | None) -> str | None:
    """The MLflow run that produced a ``models:/`` or ``runs:/`` URI; ``None`` for folders and ``s3://``.

    Raises:
        CheckpointSourceError: a ``models:/`` URI whose version or alias does not exist.
    """
    if uri.startswith("runs:/"):
        return uri.removeprefix("runs:/").split("/", 1)[0]
    if not uri.startswith("models:/"):
        return None
    try:
        return _registered_version(uri, tracking_uri)[1].run_id
    except Exception as error:  # MLflow raises several types for "not found"
        raise CheckpointSourceError(f"{uri}: no such registered model version ({error})") from error


def _pyfunc_checkpoint(folder: Path) -> Path | None:
    """The Hugging Face folder inside a model registered by ``llava_platform.registry.register_export``."""
    import yaml

    if not (folder / "MLmodel").is_file():
        return None
    flavor = yaml.safe_load((folder / "MLmodel").read_text()).get("flavors", {}).get("python_function", {})
    relative = (flavor.get("artifacts") or {}).get(CHECKPOINT_ARTIFACT, {}).get("path")
    return folder / relative if relative else None


def _download_s3(uri: str, target: Path, s3_endpoint_url: str | None) -> Path:
    import pyarrow.fs as pafs

    filesystem, prefix = filesystem_for(uri, s3_endpoint_url)
    files = [info for info in filesystem.get_file_info(pafs.FileSelector(prefix, recursive=True))
             if info.type == pafs.FileType.File]
    if not files:
        raise CheckpointSourceError(f"{uri}: no files under this prefix")
    for info in files:
        local = (target / info.path[len(prefix):].lstrip("/")).resolve()
        if not local.is_relative_to(target.resolve()):
            raise CheckpointSourceError(f"{uri}: key {info.path} points outside the download folder")
        if local.exists() and local.stat().st_size == info.size and local.stat().st_mtime >= info.mtime.timestamp():
            continue  # downloaded after the object was last written
        local.parent.mkdir(parents=True, exist_ok=True)
        with filesystem.open_input_stream(info.path) as source, open(local, "wb") as sink:
            while chunk := source.read(1 << 24):
                sink.write(chunk)
    return target
