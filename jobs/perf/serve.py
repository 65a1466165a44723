"""Performance: the endpoint on its two engines, transformers (static batches) vs vLLM (continuous batching).

    python -m jobs.perf.serve [--requests 96] [--seed 0]
    python -m jobs.perf.serve --unbatched          # also the transformers engine one request at a time
    python -m jobs.perf.serve --quick              # 32 requests per level (one wave at c=32), 8-16 tokens
    python -m jobs.perf.serve --dry-run            # compose the model and build the apps, serve nothing
    # on a GPU machine (vLLM's CUDA build in $LLAVA_VLLM_PYTHON, see README "The vLLM engine"):
    python -m jobs.perf.serve --device cuda --requests 512

Starts a local Ray and Serve on 127.0.0.1 with a bench-sized model composed here from the CPU demo's
recipe (a ~22M-parameter language model: hidden 512, 8 layers, 8 heads of 64; nothing downloaded),
deploys it on each engine with one replica, and drives each, one after the other, with the same
requests at concurrency 1, 8 and 32 through the official ``openai`` client on loopback: every request
carries an image and asks for a greedy answer of 8 to 128 tokens (``max_tokens`` drawn per request from
a seeded generator; the same list for both engines). The load is non-streaming (the transformers
engine batches only those); then a shorter streaming pass at the same concurrency measures the time to
the first token. Prints req/s, tokens/s, p50/p99 latency and p50 time to first token per engine and
level; the last line is ``vllm/transformers tokens/s at c=32: <ratio>`` (target >= 3).
"""

from __future__ import annotations

import argparse
import base64
import io
import random
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
MODEL = ["model.tiny.text_hidden_size=512", "model.tiny.text_layers=8", "model.tiny.text_heads=8",
         "model.tiny.text_vocab_size=1024"]
"""The bench-sized language model: ~22M parameters, head size 64 (runs on vLLM's CPU attention)."""
ANSWER_TOKENS = (8, 128)


def image_url() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 120, 40)).save(buffer, "PNG")
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"


def drive(base_url: str, concurrency: int, lengths: list[int], stream: bool, timeout_s: float) -> dict:
    """Send one request per entry of ``lengths`` (its ``max_tokens``), ``concurrency`` at a time.

    Returns req/s, completion tokens/s, p50/p99 latency, p50 time to first token (streaming only),
    errors and requests done (the level stops early after ``timeout_s``).
    """
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    content = [{"type": "text", "text": "What is in the picture?"}, {"type": "image_url",
                                                                    "image_url": {"url": image_url()}}]
    deadline = time.perf_counter() + timeout_s

    def one(max_tokens: int) -> tuple[float, float, int] | None:
        """(latency, time to first token, completion tokens), ``None`` when skipped, latency -1 on error."""
        if time.perf_counter() > deadline:
            return None
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
        results = [r for r in pool.map(one, lengths) if r is not None]
    elapsed = time.perf_counter() - started
    ok = [r for r in results if r[0] >= 0]
    latencies = sorted(r[0] for r in ok) or [float("nan")]
    firsts = [r[1] for r in ok if r[1] == r[1]] or [float("nan")]
    return {"rps": len(ok) / elapsed, "tps": sum(r[2] for r in ok) / elapsed, "p50": statistics.median(latencies),
            "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], "ttft": statistics.median(firsts),
            "errors": len(results) - len(ok), "done": len(results)}


def deployments(model: Path, device: str, unbatched: bool, in_process: bool) -> dict:
    """One application per engine, bound to the same model (each replica with the whole machine)."""
    limits = {"max_tokens": ANSWER_TOKENS[1]}
    gpus = 1 if device == "cuda" else 0
    common = {"model": str(model), "model_name": "tiny", "limits": limits, "device": device}
    vllm = {"enforce_eager": device != "cuda", "in_process": in_process, "num_cpus": 2 if not gpus else 1,
            "num_gpus": gpus, "max_num_seqs": 64}
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


def main(argv: list[str] | None = None) -> float | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=96, help="requests per concurrency level (non-streaming)")
    parser.add_argument("--stream-requests", type=int, default=32, help="streaming requests per level (TTFT)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the answer lengths")
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
    applications = deployments(model, args.device, args.unbatched, args.in_process)
    if args.dry_run:
        print(f"dry run: {', '.join(applications)} applications of {model}")
        return None
    lengths = [random.Random(args.seed + i).randint(*answer_tokens) for i in range(args.requests)]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)  # logical CPUs: a replica + its engine
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    results = {}
    for name, application in applications.items():
        serve.run(application, name=name, route_prefix=f"/{name}", blocking=False)
        base_url = f"http://127.0.0.1:{args.port}/{name}/v1"
        drive(base_url, 4, [16] * 8, False, 120)  # warm-up
        for concurrency in CONCURRENCY:
            load = drive(base_url, concurrency, lengths, False, args.timeout_s)
            streamed = drive(base_url, concurrency, lengths[:args.stream_requests], True, args.timeout_s)
            results[name, concurrency] = {**load, "ttft": streamed["ttft"], "errors": load["errors"] +
                                          streamed["errors"]}
            print(f"{name} c={concurrency}: {load['tps']:.0f} tokens/s", flush=True)
        serve.delete(name)

    ray.shutdown()  # nothing of Ray's prints after the figures: the last line is the README's
    print(f"\n{args.requests} requests per level (+{args.stream_requests} streamed for TTFT), image + "
          f"{answer_tokens[0]}-{answer_tokens[1]} greedy tokens, 1 replica, {args.device}")
    print(f"{'engine':<13}{'conc':>5}{'req/s':>8}{'tok/s':>8}{'p50 s':>8}{'p99 s':>8}{'ttft s':>8}{'errors':>8}"
          f"{'done':>6}")
    for (name, concurrency), r in results.items():
        print(f"{name:<13}{concurrency:>5}{r['rps']:>8.2f}{r['tps']:>8.0f}{r['p50']:>8.3f}{r['p99']:>8.3f}"
              f"{r['ttft']:>8.3f}{r['errors']:>8}{r['done']:>6}")
    ratio = results["vllm", 32]["tps"] / max(results["transformers", 32]["tps"], 1e-9)
    print(f"vllm/transformers tokens/s at c=32: {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
