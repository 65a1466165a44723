"""Deploy the OpenAI-compatible LLaVA endpoint (``serve/``) onto a running Ray cluster.

    python -m jobs.deploy --model models:/tiny-cpu-demo/1 [--config serve/config.yaml] [--api-key KEY]
    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python -m jobs.deploy \
        --model models:/tiny-cpu-demo/1 --tracking-uri http://mlflow:5000

The config is Ray Serve's own format (the same file ``serve run`` takes). This job deploys its first
application (``serve.app``'s ``LlavaServer``) with that application's ``args`` (``--model`` replaces
``args.model``) and first deployment's settings (autoscaling, resources, max ongoing requests), and
starts Serve with its ``http_options``; for several applications use ``serve deploy`` on the file.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ray import serve

from jobs.console import start_ray
from llava_platform.config.schema import ServeConfig
from serve.app import API_KEY_ENV, LlavaServer, default_config_path, exposure_warning


@dataclass(frozen=True)
class Deployment:
    """A running application: where clients reach it and its name (``serve.delete(name)`` removes it)."""

    url: str
    """Base URL; the API is under ``<url>/v1``."""
    application: str


def run(config: dict[str, Any], *, model: str | None = None, model_name: str | None = None,
        api_key: str | None = None, tracking_uri: str | None = None, http_host: str | None = None,
        http_port: int | None = None, engine: str | None = None) -> Deployment:
    """Start Serve with the config's HTTP options and run its first application.

    Args:
        config: a Ray Serve config (``serve/config.yaml``'s format).
        model, model_name, api_key, tracking_uri, http_host, http_port, engine: replace the config's values
            where given (``engine``: ``transformers`` or ``vllm``; ``args.vllm`` holds the vLLM engine's settings).

    Raises:
        RuntimeError: (from Serve) the application failed to deploy, e.g. the engine could not start: the
            message names the model and the reason.
    """
    http = dict(config.get("http_options", {}))
    http.update({k: v for k, v in {"host": http_host, "port": http_port}.items() if v is not None})
    application = config["applications"][0]
    args = dict(application.get("args", {}))
    args.update({k: v for k, v in {"model": model, "model_name": model_name, "api_key": api_key,
                                   "tracking_uri": tracking_uri, "engine": engine}.items() if v})
    ServeConfig.model_validate(args)  # a wrong key or value fails here, named, before Serve starts a replica
    deployment = next(iter(application.get("deployments", [])), {})
    options = {k: v for k, v in deployment.items() if k != "name"}
    name = application.get("name", "llava")
    warning = exposure_warning(http.get("host"), args.get("api_key") or os.environ.get(API_KEY_ENV))
    if warning:
        print(f"[deploy] WARNING: {warning}", file=sys.stderr, flush=True)
    serve.start(http_options=http)
    try:
        serve.run(LlavaServer.options(**options).bind(**args), name=name,
                  route_prefix=application.get("route_prefix", "/"), blocking=False)
    except RuntimeError as error:  # Serve says only that the deployment failed: add why (the replicas' error)
        status = serve.status().applications.get(name)
        reasons = [d.message for d in status.deployments.values() if d.message] if status else []
        raise RuntimeError(f"{error}\n" + "\n".join(reasons)) from error
    return Deployment(url=f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}", application=name)


def main(argv: list[str] | None = None) -> Deployment:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint: a folder, s3://..., models:/<name>/<version>, runs:/<id>/<path>")
    parser.add_argument("--model-name", help="the name clients send as `model` (default: the config's)")
    parser.add_argument("--config", type=Path, default=default_config_path(), help="a Ray Serve config file")
    parser.add_argument("--api-key", help="require Authorization: Bearer <key> (default: LLAVA_SERVE_API_KEY)")
    parser.add_argument("--tracking-uri", help="MLflow for models:/ and runs:/ URIs (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--http-host", help="address the endpoint listens on (default: the config's http_options)")
    parser.add_argument("--http-port", type=int, help="its port (default: the config's http_options)")
    parser.add_argument("--engine", choices=["transformers", "vllm"], help="what generates (default: the config's)")
    args = parser.parse_args(argv)
    config = yaml.safe_load(args.config.read_text())
    start_ray(address="auto")
    deployment = run(config, model=args.model, model_name=args.model_name, api_key=args.api_key,
                     tracking_uri=args.tracking_uri, http_host=args.http_host, http_port=args.http_port,
                     engine=args.engine)
    print(f"serving on {deployment.url}/v1/chat/completions", flush=True)
    return deployment


if __name__ == "__main__":
    main()
