"""LLaVA's own data method: GPT-assisted visual instruction data from captions and boxes, on Ray Data,
against any OpenAI-compatible endpoint.

    python -m jobs.generate_data --captions coco/captions_train2017.json --instances coco/instances_train2017.json \\
        --endpoint https://api.openai.com/v1 --model gpt-4o-2024-08-06 --types conversation,detail,reasoning \\
        --output data/llava-instruct --concurrency 64 --requests-per-minute 5000 --tokens-per-minute 2000000 \\
        --max-total-tokens 50000000 --price-per-1m-input 2.5 --price-per-1m-output 10      # key: $OPENAI_API_KEY
    python -m jobs.generate_data --annotations contexts.jsonl --endpoint http://teacher:8000/v1 --model llava ...

For every image and type the teacher gets the image's captions and normalised boxes with the type's
system message and few-shot examples (``llava_platform/datagen/prompts``; ``--prompts DIR`` overrides
them) and never the pixels. Responses become LLaVA-format records (``<type>.json`` in ``--output``, ready
for stage 2 with the images' folder as ``data.image_root``) or quarantined ones with a reason
(``quarantine.jsonl``); ``manifest.json`` holds the counts, token usage, endpoint, model and prompt
version, and an MLflow run the same as params, metrics and artifacts.

Run it again with the same ``--output`` to resume: every (image, type) already written is skipped, so a
killed run or one stopped by ``--max-total-tokens`` loses nothing and pays for nothing twice; only what
failed (the endpoint kept failing) or was not sent (the budget) is asked for.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray

from jobs.console import PreflightError, job_log, start_ray
from llava_platform import tracking
from llava_platform.datagen.annotations import AnnotationFormatError, ImageContext, read_coco, read_contexts
from llava_platform.datagen.client import ClientSettings
from llava_platform.datagen.prompts import TYPES, PromptError, load_prompts
from pipelines.generate import GenerationPlan, Journal, commit, generate, token_ledger, unit_rows

METRIC_PREFIX = "datagen"


log = job_log("generate_data")
"""This job's lines on standard error (``jobs.console.say``)."""


def main(argv: list[str] | None = None) -> GenerateResult:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_argument_group("input (COCO-style, or LLaVA-style JSON lines)")
    source.add_argument("--captions", help="COCO captions file (with --instances)")
    source.add_argument("--instances", help="COCO instances file: boxes and category names")
    source.add_argument("--annotations", help='JSON lines {"id", "image", "captions", "boxes": [{"label", "bbox"}]}')
    parser.add_argument("--endpoint", required=True, help="base URL of an OpenAI-compatible API (.../v1)")
    parser.add_argument("--model", required=True, help="the teacher model's name there")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    parser.add_argument("--types", default=",".join(TYPES), help=f"comma-separated, of {', '.join(TYPES)}")
    parser.add_argument("--output", type=Path, required=True, help="folder of the results and the journals")
    parser.add_argument("--prompts", help="a folder with <type>.yaml prompt files (default: the packaged version)")
    parser.add_argument("--limit", type=int, help="only the first N images")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight to the endpoint")
    parser.add_argument("--requests-per-minute", type=float, help="the endpoint's request rate limit")
    parser.add_argument("--tokens-per-minute", type=float, help="the endpoint's token rate limit")
    parser.add_argument("--max-total-tokens", type=int, help="hard cap on this run's tokens (prompt + completion)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="per response; reaching it is 'truncated'")
    parser.add_argument("--tokenizer", help="the teacher's tokenizer (Hugging Face name or folder, read locally): "
                        "exact prompt counts for --max-total-tokens; without it, an upper bound from the bytes")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-retries", type=int, default=6, help="per request: 429, 5xx, timeouts, malformed")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--actors", type=int, default=1, help="Ray Data actors sharing the concurrency")
    parser.add_argument("--price-per-1m-input", type=float, default=0.0, help="for the cost estimate")
    parser.add_argument("--price-per-1m-output", type=float, default=0.0)
    parser.add_argument("--tracking-uri", help="MLflow (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--experiment", default="datagen")
    parser.add_argument("--s3-endpoint-url", help="S3-compatible endpoint for s3:// annotations")
    args = parser.parse_args(argv)
    kinds = tuple(kind.strip() for kind in args.types.split(",") if kind.strip())
    settings = ClientSettings(
        url=args.endpoint, model=args.model, concurrency=args.concurrency,
        requests_per_minute=args.requests_per_minute, tokens_per_minute=args.tokens_per_minute,
        max_tokens=args.max_tokens, temperature=args.temperature, max_retries=args.max_retries,
        timeout_s=args.timeout, tokenizer=args.tokenizer)
    try:
        return run(captions=args.captions, instances=args.instances, annotations=args.annotations, kinds=kinds,
                   client=settings, output=args.output, prompts=args.prompts, limit=args.limit,
                   max_total_tokens=args.max_total_tokens, actors=args.actors, api_key_env=args.api_key_env,
                   prices=(args.price_per_1m_input, args.price_per_1m_output),
                   tracking_uri=tracking.resolve_tracking_uri(args.tracking_uri), experiment=args.experiment,
                   s3_endpoint_url=args.s3_endpoint_url)
    except PreflightError as error:
        parser.exit(2, str(error))


@dataclass(frozen=True)
class GenerateResult:
    files: dict[str, Path]
    """Type -> its LLaVA-format JSON file (every record journaled so far, this run's and earlier ones')."""
    manifest: dict[str, Any]
    run_id: str


def run(*, kinds: tuple[str, ...], client: ClientSettings, output: Path, tracking_uri: str,
        captions: str | None = None, instances: str | None = None, annotations: str | None = None,
        prompts: str | None = None, limit: int | None = None, max_total_tokens: int | None = None,
        actors: int = 1, api_key_env: str = "OPENAI_API_KEY", prices: tuple[float, float] = (0.0, 0.0),
        experiment: str = "datagen", s3_endpoint_url: str | None = None) -> GenerateResult:
    """Read, ask, journal, commit, track.

    Raises:
        PreflightError: unknown types, no or two inputs, an annotations or prompt file in the wrong format.
    """
    contexts, prompt_set = preflight(kinds, captions, instances, annotations, prompts, s3_endpoint_url)
    contexts = contexts[:limit] if limit else contexts
    output.mkdir(parents=True, exist_ok=True)
    journaled, _ = Journal(output).entries()
    rows = unit_rows(contexts, kinds, skip=set(journaled))
    total = len(contexts) * len(kinds)
    log(f"{len(contexts)} images x {len(kinds)} types = {total} responses; {total - len(rows)} already written "
        f"(journals in {output / 'parts'}), {len(rows)} to ask {client.model} at {client.url} "
        f"(prompts {prompt_set.version}, concurrency {client.concurrency})")
    params = {"endpoint": client.url, "model": client.model, "types": ",".join(kinds),
              "prompt_version": prompt_set.version, "images": str(len(contexts)),
              "concurrency": str(client.concurrency),
              "max_total_tokens": str(max_total_tokens), "max_tokens": str(client.max_tokens),
              "temperature": str(client.temperature)}
    run_id = tracking.start_run(tracking_uri, experiment, "generate_data", params=params)

    stats = Stats(len(rows), prices)
    if rows:
        start_ray()
        ledger = token_ledger(max_total_tokens)
        plan = GenerationPlan(client=client, api_key_env=api_key_env, prompts=prompt_set, output=str(output),
                              actors=actors)
        batch_size = max(1, 4 * client.concurrency // actors)
        for outcome in generate(ray.data.from_items(rows), plan, ledger, batch_size=batch_size).iter_rows():
            stats.add(outcome)
            stats.progress()
        stats.progress(final=True)
    summary = commit(output, kinds)
    manifest = {"endpoint": client.url, "model": client.model, "prompt_version": prompt_set.version,
                "types": list(kinds), "images": len(contexts), "this_run": stats.as_dict(),
                "written": summary["records"], "quarantined": summary["quarantined"],
                "usage_all_runs": summary["journaled_usage"], "torn_journal_lines": summary["torn_lines"],
                "settings": asdict(client) | {"max_total_tokens": max_total_tokens, "actors": actors}}
    (output / "manifest.json").write_text(json.dumps(manifest, indent=1))
    metrics = {f"{METRIC_PREFIX}/written/{kind}": n for kind, n in summary["records"].items()}
    metrics |= {f"{METRIC_PREFIX}/quarantined/{reason}": n for reason, n in summary["quarantined"].items()}
    metrics |= {f"{METRIC_PREFIX}/{name}": value for name, value in stats.as_dict().items()
                if isinstance(value, int | float)}
    tracking.log_metrics(tracking_uri, run_id, metrics, step=0)
    for name in ("manifest.json", "quarantine.jsonl"):
        tracking.log_artifact(tracking_uri, run_id, output / name, artifact_path="datagen")
    tracking.end_run(tracking_uri, run_id)
    files = {kind: output / f"{kind}.json" for kind in kinds}
    log(f"written {summary['records']}, quarantined {summary['quarantined'] or 'none'}; this run "
        f"{stats.requests} requests ({stats.retries} retries), {stats.prompt_tokens} + {stats.completion_tokens} "
        f"tokens, ~${stats.cost():.2f}; failed {stats.status.get('failed', 0)}, not sent (budget) "
        f"{stats.status.get('skipped', 0)}: run again to ask for them. MLflow run {run_id}")
    for reason, count in sorted(stats.failures.items(), key=lambda item: -item[1])[:5]:
        log(f"failed {count}x: {reason}")
    return GenerateResult(files=files, manifest=manifest, run_id=run_id)


def preflight(kinds, captions, instances, annotations, prompts, s3_endpoint_url) -> tuple[list[ImageContext], Any]:
    problems = [f"--types: {kind!r} is not one of {', '.join(TYPES)}" for kind in kinds if kind not in TYPES]
    if not kinds:
        problems.append(f"--types: give at least one of {', '.join(TYPES)}")
    coco = captions or instances
    if bool(coco) == bool(annotations) or (coco and not (captions and instances)):
        problems.append("--captions with --instances (COCO-style), or --annotations (JSON lines): exactly one input")
    contexts: list[ImageContext] = []
    try:
        if annotations and not coco:
            contexts = read_contexts(annotations, s3_endpoint_url)
        elif captions and instances and not annotations:
            contexts = read_coco(captions, instances, s3_endpoint_url)
    except AnnotationFormatError as error:
        problems.append(f"--{'annotations' if annotations else 'captions/--instances'}: {error}")
    prompt_set = None
    try:
        prompt_set = load_prompts(prompts, tuple(k for k in kinds if k in TYPES))
    except PromptError as error:
        problems.append(f"--prompts: {error}")
    if problems:
        raise PreflightError("generate_data", problems)
    return contexts, prompt_set


class Stats:
    """This run's counts, tokens and the progress line (every 10 s, with the rate and an ETA)."""

    def __init__(self, total: int, prices: tuple[float, float]):
        self.total, self.prices, self.started, self.printed = total, prices, time.monotonic(), 0.0
        self.first_at: float | None = None  # the rate counts from the first response (not Ray's start)
        self.finished = self.requests = self.retries = self.prompt_tokens = self.completion_tokens = 0
        self.tokens_charged = self.unreported_tries = 0
        self.status: dict[str, int] = {}
        self.failures: dict[str, int] = {}
        """The endpoint's last error per failed response, counted (the first 100 characters)."""

    def add(self, outcome: dict[str, Any]) -> None:
        self.finished += 1
        self.first_at = self.first_at or time.monotonic()
        self.status[outcome["status"]] = self.status.get(outcome["status"], 0) + 1
        if outcome["status"] == "failed":
            reason = outcome["reason"][:100]
            self.failures[reason] = self.failures.get(reason, 0) + 1
        self.requests += outcome["requests"]
        self.retries += outcome["retries"]
        self.prompt_tokens += outcome["prompt_tokens"]
        self.completion_tokens += outcome["completion_tokens"]
        self.tokens_charged += outcome["tokens_charged"]
        self.unreported_tries += outcome["unreported_tries"]

    def cost(self) -> float:
        return (self.prompt_tokens * self.prices[0] + self.completion_tokens * self.prices[1]) / 1e6

    def progress(self, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.printed < 10:
            return
        self.printed = now
        rate = (self.finished - 1) / (now - self.first_at) if self.first_at and now > self.first_at else 0.0
        pace = f"{rate:.1f}/s, ETA {(self.total - self.finished) / rate:.0f} s" if rate else "first response"
        log(f"{self.finished}/{self.total} ({pace}): ok {self.status.get('ok', 0)}, "
            f"quarantined {self.status.get('quarantined', 0)}, failed {self.status.get('failed', 0)}, "
            f"not sent {self.status.get('skipped', 0)}; {self.prompt_tokens + self.completion_tokens} tokens "
            f"reported ({self.tokens_charged} charged to the cap), ~${self.cost():.2f}")

    def as_dict(self) -> dict[str, Any]:
        return {"responses": self.finished, "ok": self.status.get("ok", 0),
                "quarantined": self.status.get("quarantined", 0), "failed": self.status.get("failed", 0),
                "not_sent_budget": self.status.get("skipped", 0), "requests": self.requests, "retries": self.retries,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "tokens_charged": self.tokens_charged, "unreported_tries": self.unreported_tries,
                "estimated_cost": round(self.cost(), 6), "seconds": round(time.monotonic() - self.started, 3),
                "failure_reasons": self.failures}


if __name__ == "__main__":
    main()
