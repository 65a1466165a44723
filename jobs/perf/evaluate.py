"""Performance: ``jobs.evaluate`` batch inference on its two engines, questions/s side by side.

    python -m jobs.perf.evaluate [--questions 256] [--max-new-tokens 32]
    python -m jobs.perf.evaluate --quick       # 8 questions of 4 tokens
    python -m jobs.perf.evaluate --dry-run     # compose the model and write the questions only

Composes the serving benchmark's bench-sized model (``jobs.perf.serve.MODEL``: a ~22M-parameter
language model, nothing downloaded), writes ``--questions`` synthetic evaluation questions with their
images, and runs ``jobs.evaluate`` on them once per engine on a local Ray (one replica with the whole
2-core machine, batches of ``--batch-size``, greedy answers of up to ``--max-new-tokens``). Each run is
timed whole, as a user sees it (Ray Data's start and the model load or engine start included). Prints
questions/s per engine, how many answers are identical, and last ``vllm/transformers questions/s: <ratio>``.
Both engines run the same explicit ``--dtype`` (float32 by default, printed).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import ray

from jobs import compose, evaluate
from jobs.perf.serve import MODEL
from llava_platform.config import load_recipe
from llava_platform.config.schema import InferenceConfig
from llava_platform.data.synthetic import write_synthetic_dataset


def main(argv: list[str] | None = None) -> float | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both engines' dtype")
    parser.add_argument("--quick", action="store_true", help="8 questions of up to 4 tokens, batches of 8")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.questions, args.max_new_tokens, args.batch_size = 8, 4, 8

    root = Path(tempfile.mkdtemp(prefix="bench-evaluate-"))
    model = compose.run(load_recipe("tiny_cpu_demo", MODEL), root / "model")
    files = write_synthetic_dataset(root / "data", train=0, eval=args.questions, seed=0)
    if args.dry_run:
        print(f"dry run: {args.questions} questions in {files['eval']}, model {model}")
        return None
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)  # the figures are the output; logs: Ray's folder
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    timings, answers = {}, {}
    for engine in ("transformers", "vllm"):
        started = time.perf_counter()
        inference = InferenceConfig(engine=engine, dtype=args.dtype, vllm={"enforce_eager": True}, num_replicas=1,
                                    cpus_per_replica=2,
                                    batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
        result = evaluate.run(model=str(model), data=[str(files["eval"])], image_root=str(root / "data"),
                              output=root / engine, tracking_uri=tracking, inference=inference)
        timings[engine] = time.perf_counter() - started
        answers[engine] = {r["id"]: r["prediction"] for r in map(json.loads,
                                                                  result.predictions.read_text().splitlines())}
    ray.shutdown()  # nothing of Ray's prints after the figures: the last line is the README's
    same = sum(answers["vllm"][k] == answers["transformers"][k] for k in answers["vllm"])
    print(f"\n{args.questions} questions, greedy answers of up to {args.max_new_tokens} tokens, batches of "
          f"{args.batch_size}, 1 replica on 2 CPUs, {args.dtype} on both engines (whole runs: Ray Data start, model "
          "load or engine start included)")
    for engine, seconds in timings.items():
        print(f"{engine:<13}{seconds:>8.1f} s {args.questions / seconds:>8.2f} questions/s")
    print(f"identical answers: {same}/{len(answers['vllm'])}")
    ratio = timings["transformers"] / timings["vllm"]
    print(f"vllm/transformers questions/s: {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
