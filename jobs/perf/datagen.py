"""Performance: the data generation job's request throughput against a teacher with a fixed service time.

    python -m jobs.perf.datagen [--service-time 0.25] [--waves 16] [--levels 8,32,64] [--repeats 3]
    python -m jobs.perf.datagen --quick          # c=32 only, 2 waves of 0.05 s answers, one run
    python -m jobs.perf.datagen --dry-run        # write the inputs, start and stop the server

Runs ``jobs.generate_data`` (local Ray, one actor) against the scripted OpenAI-protocol teacher
(``llava_platform.testing.chat_server``, its own process on 127.0.0.1) that answers every request after exactly
``--service-time`` seconds with a well-formed description. At concurrency c, a perfect client keeps c
requests in flight and finishes c / service-time requests per second: the ideal. Each level asks for
c x ``--waves`` descriptions (one per image) and measures the job's throughput in steady state, from
the server's first request to its last answer (Ray's start, reading the inputs and committing the
files are reported beside it as the whole run's time). Every level runs ``--repeats`` times, the levels
interleaved; prints the medians of requests/s, the ideal and their ratio per level; the last line is
``datagen throughput/ideal at c=32: <ratio>`` (target >= 0.8).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import ray

from jobs import generate_data
from llava_platform.testing.chat_server import ChatServer


def main(argv: list[str] | None = None) -> dict[int, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--service-time", type=float, default=0.25, help="seconds per answer")
    parser.add_argument("--waves", type=int, default=16, help="requests per level = concurrency x waves")
    parser.add_argument("--levels", default="8,32,64", help="concurrency levels")
    parser.add_argument("--repeats", type=int, default=3, help="runs per level, interleaved; medians are printed")
    parser.add_argument("--quick", action="store_true", help="c=32 only, 2 waves of 0.05 s answers, one run")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.levels, args.waves, args.service_time, args.repeats = "32", 2, 0.05, 1
    levels = [int(level) for level in args.levels.split(",")]
    root = Path(tempfile.mkdtemp(prefix="bench-datagen-"))
    ratios = {}
    with ChatServer(service_time=args.service_time) as server:
        if args.dry_run:
            print(f"dry run: server at {server.url}; levels {levels}, {args.waves} waves, {args.service_time} s")
            return {}
        rates: dict[int, list[float]] = {level: [] for level in levels}
        wholes: dict[int, list[float]] = {level: [] for level in levels}
        for repeat in range(args.repeats):
            for level in levels:  # interleaved, so that the machine's drift hits every level alike
                rate, whole = one_run(server, root / f"r{repeat}-c{level}", level, level * args.waves)
                rates[level].append(rate)
                wholes[level].append(whole)
        ray.shutdown()  # nothing of Ray's prints after the figures: the last line is the README's
        print(f"{'c':>4} {'requests':>9} {'req/s':>8} {'ideal':>8} {'ratio':>6} {'whole run s':>12}   "
              f"(medians of {args.repeats})")
        for level in levels:
            rate, ideal = statistics.median(rates[level]), level / args.service_time
            ratios[level] = rate / ideal
            print(f"{level:>4} {level * args.waves:>9} {rate:>8.1f} {ideal:>8.1f} {ratios[level]:>6.2f} "
                  f"{statistics.median(wholes[level]):>12.1f}", flush=True)
    if 32 in ratios:
        print(f"datagen throughput/ideal at c=32: {ratios[32]:.2f}")
    return ratios


def one_run(server: ChatServer, folder: Path, level: int, count: int) -> tuple[float, float]:
    """One job of ``count`` descriptions at concurrency ``level``: (steady requests/s, whole run's seconds)."""
    folder.mkdir(parents=True)
    annotations = folder / "contexts.jsonl"
    annotations.write_text("".join(json.dumps({"id": f"{folder.name}-{i}", "image": "x.jpg",
                                               "captions": [f"Image {i}: a red circle."], "boxes": []}) + "\n"
                                   for i in range(count)))
    server.reset()
    started = time.monotonic()
    result = generate_data.main(["--annotations", str(annotations), "--endpoint", server.url, "--model", "b",
                                 "--types", "detail", "--output", str(folder / "out"), "--concurrency", str(level),
                                 "--max-retries", "0", "--tracking-uri", f"sqlite:///{folder.parent / 'mlflow.db'}"])
    whole = time.monotonic() - started
    stats = server.stats()
    assert result.manifest["this_run"]["ok"] == count, result.manifest["this_run"]
    return stats["requests"] / (stats["last_answer_at"] - stats["first_request_at"]), whole


if __name__ == "__main__":
    main()
