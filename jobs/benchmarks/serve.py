"""Benchmark: requests/s and latency of the endpoint, batched vs one request at a time.

    python -m jobs.benchmarks.serve [--requests 192] [--max-tokens 16]
    python -m jobs.benchmarks.serve --dry-run     # compose the model and build both deployments, serve nothing

Starts a local Ray and Serve on 127.0.0.1 with the tiny CPU-demo model (composed here, nothing
downloaded), deploys it twice — batched (``max_batch_size`` 32) and unbatched (``max_batch_size``
1, the same model answering one request at a time) — and drives each with a bounded load generator
(the official ``openai`` client, loopback only) at concurrency 1, 8 and 32. Every request carries
an image and asks for ``--max-tokens`` greedy tokens. Target: at concurrency 32, batched >= 3x the
unbatched throughput, with zero errors.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import ray
from PIL import Image
from ray import serve

from jobs import compose
from llava_platform.config import load_recipe
from serve.app import LlavaServer

CONCURRENCY = (1, 8, 32)


def image_url() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 120, 40)).save(buffer, "PNG")
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"


def drive(base_url: str, concurrency: int, requests: int, max_tokens: int, timeout_s: float) -> dict:
    """Send ``requests`` requests, ``concurrency`` at a time; stop early after ``timeout_s``."""
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    content = [{"type": "text", "text": "What is in the picture?"}, {"type": "image_url",
                                                                    "image_url": {"url": image_url()}}]
    deadline = time.perf_counter() + timeout_s

    def one(_: int) -> float | None:
        if time.perf_counter() > deadline:
            return None
        started = time.perf_counter()
        try:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                           max_tokens=max_tokens, temperature=0)
        except openai.OpenAIError:
            return -1.0
        return time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = [r for r in pool.map(one, range(requests)) if r is not None]
    elapsed = time.perf_counter() - started
    latencies = sorted(r for r in results if r >= 0) or [float("nan")]
    return {"rps": sum(r >= 0 for r in results) / elapsed, "p50": statistics.median(latencies),
            "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "errors": sum(r < 0 for r in results), "done": len(results)}


def deployments(model: Path, batch_wait_s: float, max_tokens: int) -> dict:
    """The batched and the unbatched application, bound to the same model."""
    limits = {"max_tokens": max_tokens}
    return {name: LlavaServer.options(num_replicas=1, max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
            .bind(model=str(model), model_name="tiny", max_batch_size=batch, batch_wait_timeout_s=batch_wait_s,
                  limits=limits)
            for name, batch in (("batched", 32), ("unbatched", 1))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=192, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--timeout-s", type=float, default=180, help="cap per concurrency level")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--batch-wait-s", type=float, default=0.05, help="batch_wait_timeout_s of the batched app")
    parser.add_argument("--dry-run", action="store_true", help="compose the model and build both apps, then exit")
    args = parser.parse_args(argv)

    model = compose.run(load_recipe("tiny_cpu_demo"), Path(tempfile.mkdtemp()) / "model")
    applications = deployments(model, args.batch_wait_s, args.max_tokens)
    if args.dry_run:
        print(f"dry run: {', '.join(applications)} applications of {model}")
        return
    ray.init(num_cpus=2, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    results = {}
    for name, application in applications.items():
        serve.run(application, name=name, route_prefix=f"/{name}", blocking=False)
        base_url = f"http://127.0.0.1:{args.port}/{name}/v1"
        drive(base_url, 4, 8, args.max_tokens, 60)  # warm-up
        for concurrency in CONCURRENCY:
            results[name, concurrency] = drive(base_url, concurrency, args.requests, args.max_tokens, args.timeout_s)
        serve.delete(name)

    print(f"\n{args.requests} requests per level, image + {args.max_tokens} greedy tokens, 1 CPU replica")
    print(f"{'deployment':<11}{'conc':>5}{'req/s':>8}{'p50 s':>8}{'p99 s':>8}{'errors':>8}{'done':>6}")
    for (name, concurrency), r in results.items():
        print(f"{name:<11}{concurrency:>5}{r['rps']:>8.2f}{r['p50']:>8.3f}{r['p99']:>8.3f}{r['errors']:>8}"
              f"{r['done']:>6}")
    ratio = results["batched", 32]["rps"] / max(results["unbatched", 32]["rps"], 1e-9)
    print(f"batched / unbatched at concurrency 32: {ratio:.2f}x")


if __name__ == "__main__":
    main()
