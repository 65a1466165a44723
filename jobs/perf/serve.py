"""Performance: the endpoint on its two engines, and the endpoint on vLLM against vLLM's own OpenAI server.

    python -m jobs.perf.serve [--requests 96] [--seed 0]
    python -m jobs.perf.serve --unbatched          # also the transformers engine one request at a time
    python -m jobs.perf.serve --quick              # 32 requests per level (one wave at c=32), 8-16 tokens
    python -m jobs.perf.serve --dry-run            # compose the model and build the apps, serve nothing
    # on a GPU machine (vLLM's CUDA build in $LLAVA_VLLM_PYTHON, see README "The vLLM engine"):
    python -m jobs.perf.serve --device cuda --requests 512

Starts a local Ray and Serve on 127.0.0.1 with a bench-sized model composed here from the CPU demo's
recipe (a ~22M-parameter language model: hidden 512, 8 layers, 8 heads of 64; nothing downloaded),
deploys it on each engine with one replica, then starts vLLM's own OpenAI server
(``python -m vllm.entrypoints.openai.api_server`` from the engine environment, ``.venv-vllm``) on the same
model with the same engine settings, and drives each, one after the other, with the same requests at
concurrency 1, 8 and 32 through the official ``openai`` client on loopback. Fair by construction: every
engine runs the same explicit ``--dtype`` (float32 by default, printed); every request carries its own
image (seeded colours and size) and its own question (seeded), so prefix caching (vLLM's default, on in
both vLLM runs, printed) cannot reuse one request's prompt for the next; greedy answers of 8 to 128
tokens (``max_tokens`` drawn per request from a seeded generator; the same list everywhere). The load is
non-streaming (the transformers engine batches only those); then a shorter streaming pass at the same
concurrency measures the time to the first token. Prints req/s, tokens/s, p50/p99 latency and p50 time to
first token per target and level, ``vllm/transformers tokens/s at c=32: <ratio>`` (target >= 3), and last
``endpoint/bare-vllm tokens/s at c=32: <ratio>`` (target >= 0.95: what our ingress costs).
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import random
import statistics
import subprocess
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import ray
from PIL import Image
from ray import serve

from jobs import compose
from llava_platform.config import load_recipe
from llava_platform.vllm_engine import CPU_KV_CACHE_BYTES, default_engine_python
from serve.app import LlavaServer

CONCURRENCY = (1, 8, 32)
MODEL = ["model.tiny.text_hidden_size=512", "model.tiny.text_layers=8", "model.tiny.text_heads=8",
         "model.tiny.text_vocab_size=1024"]
"""The bench-sized language model: ~22M parameters, head size 64 (runs on vLLM's CPU attention)."""
ANSWER_TOKENS = (8, 128)
QUESTIONS = ("What is in the picture?", "Describe the colours you see.", "Is there anything red here?",
             "What shape is in the image?", "Where is the brightest part?", "How many objects are shown?")
MAX_NUM_SEQS = 64


def requests_for(seed: int, count: int, answer_tokens: tuple[int, int]) -> list[tuple[list[dict], int]]:
    """``count`` requests: (the user message's content, max_tokens), each with its own image and question."""
    made = []
    for i in range(count):
        rng = random.Random(seed * 100_003 + i)
        buffer = io.BytesIO()
        size = (rng.randint(40, 96), rng.randint(32, 80))
        Image.new("RGB", size, tuple(rng.randint(0, 255) for _ in range(3))).save(buffer, "PNG")
        url = f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"
        question = f"{rng.choice(QUESTIONS)} (request {i})"
        made.append(([{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}],
                     rng.randint(*answer_tokens)))
    return made


def drive(base_url: str, concurrency: int, requests: list[tuple[list[dict], int]], stream: bool,
          timeout_s: float) -> dict:
    """Send each of ``requests`` (content, max_tokens), ``concurrency`` at a time.

    Returns req/s, completion tokens/s, p50/p99 latency, p50 time to first token (streaming only),
    errors and requests done (the level stops early after ``timeout_s``).
    """
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    deadline = time.perf_counter() + timeout_s

    def one(request: tuple[list[dict], int]) -> tuple[float, float, int] | None:
        """(latency, time to first token, completion tokens), ``None`` when skipped, latency -1 on error."""
        if time.perf_counter() > deadline:
            return None
        content, max_tokens = request
        started, first = time.perf_counter(), None
        try:
            if not stream:
                reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                                       max_tokens=max_tokens, temperature=0)
                return time.perf_counter() - started, float("nan"), reply.usage.completion_tokens
            tokens = 0
            for chunk in client.chat.completions.create(model="tiny", stream=True, temperature=0,
                                                        max_tokens=max_tokens,
                                                        messages=[{"role": "user", "content": content}]):
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - started
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            latency = time.perf_counter() - started
            return latency, first if first is not None else latency, tokens
        except openai.OpenAIError:
            return -1.0, float("nan"), 0

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = [r for r in pool.map(one, requests) if r is not None]
    elapsed = time.perf_counter() - started
    ok = [r for r in results if r[0] >= 0]
    latencies = sorted(r[0] for r in ok) or [float("nan")]
    firsts = [r[1] for r in ok if r[1] == r[1]] or [float("nan")]
    return {"rps": len(ok) / elapsed, "tps": sum(r[2] for r in ok) / elapsed, "p50": statistics.median(latencies),
            "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], "ttft": statistics.median(firsts),
            "errors": len(results) - len(ok), "done": len(results)}


def deployments(model: Path, device: str, dtype: str, unbatched: bool, in_process: bool) -> dict:
    """One application per engine, bound to the same model in the same dtype (each replica with the whole
    machine)."""
    limits = {"max_tokens": ANSWER_TOKENS[1]}
    gpus = 1 if device == "cuda" else 0
    common = {"model": str(model), "model_name": "tiny", "limits": limits, "device": device, "dtype": dtype}
    vllm = {"enforce_eager": device != "cuda", "in_process": in_process, "num_cpus": 2 if not gpus else 1,
            "num_gpus": gpus, "max_num_seqs": MAX_NUM_SEQS}
    apps = {
        "transformers": LlavaServer.options(num_replicas=1, max_ongoing_requests=64,
                                            ray_actor_options={"num_cpus": 2, "num_gpus": gpus})
        .bind(**common, max_batch_size=32, batch_wait_timeout_s=0.02),
        "vllm": LlavaServer.options(num_replicas=1, max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
        .bind(**common, engine="vllm", vllm=vllm),
    }
    if unbatched:
        apps["unbatched"] = LlavaServer.options(num_replicas=1, max_ongoing_requests=64,
                                                ray_actor_options={"num_cpus": 2, "num_gpus": gpus}).bind(
            **common, max_batch_size=1)
    return apps


class BareVllm:
    """vLLM's own OpenAI server on ``model``, with the endpoint's engine settings (dtype, eager on CPU, the
    KV cache, sequences in flight, prefix caching at vLLM's default)."""

    def __init__(self, model: Path, dtype: str, device: str, port: int):
        python = default_engine_python() or "python"
        command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name",
                   "tiny", "--dtype", dtype, "--port", str(port), "--host", "127.0.0.1", "--max-num-seqs",
                   str(MAX_NUM_SEQS), "--disable-log-stats"]
        if device != "cuda":
            command += ["--enforce-eager", "--kv-cache-memory-bytes", str(CPU_KV_CACHE_BYTES)]
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})

    def wait(self, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM's server exited ({self.process.returncode}); see {self.log.name}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"vLLM's server did not answer in {timeout_s} s; see {self.log.name}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def main(argv: list[str] | None = None) -> float | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=96, help="requests per concurrency level (non-streaming)")
    parser.add_argument("--stream-requests", type=int, default=32, help="streaming requests per level (TTFT)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the images, questions and answer lengths")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="every engine's dtype (the bench model is composed in float32)")
    parser.add_argument("--timeout-s", type=float, default=300, help="cap per level")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--unbatched", action="store_true", help="also the transformers engine unbatched")
    parser.add_argument("--in-process", action="store_true", help="vLLM's engine core in the actor's process")
    parser.add_argument("--quick", action="store_true", help="32 requests + 8 streamed per level, 8-16 tokens each")
    parser.add_argument("--dry-run", action="store_true", help="compose the model and build the apps, then exit")
    args = parser.parse_args(argv)
    answer_tokens = (ANSWER_TOKENS[0], 16) if args.quick else ANSWER_TOKENS
    if args.quick:
        args.requests, args.stream_requests = 32, 8

    model = compose.run(load_recipe("tiny_cpu_demo", MODEL), Path(tempfile.mkdtemp()) / "model")
    applications = deployments(model, args.device, args.dtype, args.unbatched, args.in_process)
    if args.dry_run:
        print(f"dry run: {', '.join(applications)} applications and vLLM's own server of {model} in {args.dtype}")
        return None
    load_requests = requests_for(args.seed, args.requests, answer_tokens)
    warm_up = requests_for(args.seed + 1, 8, (16, 16))
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)  # logical CPUs: a replica + its engine
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    results = {}

    def measure(name: str, base_url: str) -> None:
        drive(base_url, 4, warm_up, False, 120)
        for concurrency in CONCURRENCY:
            load = drive(base_url, concurrency, load_requests, False, args.timeout_s)
            streamed = drive(base_url, concurrency, load_requests[:args.stream_requests], True, args.timeout_s)
            results[name, concurrency] = {**load, "ttft": streamed["ttft"], "errors": load["errors"] +
                                          streamed["errors"]}
            print(f"{name} c={concurrency}: {load['tps']:.0f} tokens/s", flush=True)

    for name, application in applications.items():
        serve.run(application, name=name, route_prefix=f"/{name}", blocking=False)
        measure(name, f"http://127.0.0.1:{args.port}/{name}/v1")
        serve.delete(name)
    ray.shutdown()  # the bare server gets the machine to itself, as each deployment did
    bare = BareVllm(model, args.dtype, args.device, args.port + 1)
    try:
        bare.wait()
        measure("bare-vllm", f"{bare.url}/v1")
    finally:
        bare.stop()

    print(f"\n{args.requests} requests per level (+{args.stream_requests} streamed for TTFT), each its own image "
          f"and question + {answer_tokens[0]}-{answer_tokens[1]} greedy tokens, 1 replica, {args.device}, dtype "
          f"{args.dtype} on every engine, vLLM prefix caching on (its default) in both vLLM runs")
    print(f"{'engine':<13}{'conc':>5}{'req/s':>8}{'tok/s':>8}{'p50 s':>8}{'p99 s':>8}{'ttft s':>8}{'errors':>8}"
          f"{'done':>6}")
    for (name, concurrency), r in results.items():
        print(f"{name:<13}{concurrency:>5}{r['rps']:>8.2f}{r['tps']:>8.0f}{r['p50']:>8.3f}{r['p99']:>8.3f}"
              f"{r['ttft']:>8.3f}{r['errors']:>8}{r['done']:>6}")
    ratio = results["vllm", 32]["tps"] / max(results["transformers", 32]["tps"], 1e-9)
    print(f"p50 time to first token at c=32: endpoint on vllm {results['vllm', 32]['ttft']:.3f} s, bare vllm "
          f"{results['bare-vllm', 32]['ttft']:.3f} s")
    print(f"vllm/transformers tokens/s at c=32: {ratio:.2f}")
    ingress = results["vllm", 32]["tps"] / max(results["bare-vllm", 32]["tps"], 1e-9)
    print(f"endpoint/bare-vllm tokens/s at c=32: {ingress:.2f}")
    return ingress


if __name__ == "__main__":
    main()
