"""Performance: the driver's memory while a large LLaVA-NeXT data mixture is planned.

    python -m jobs.perf.mixture                # 100 sources, 4,000,000 records
    python -m jobs.perf.mixture --quick        # 10 sources, 100,000 records
    python -m jobs.perf.mixture --dry-run      # the YAML and the sizes, nothing written

One run: ``--sources`` JSON-lines files of short LLaVA records (``--rows`` in all, a quarter of the files
JSON arrays), a data YAML over them with every strategy (``all``, ``first:10%``, ``end:N``, ``random:50%``),
then ``pipelines.sources.plan_sources`` on a local Ray: every file counted on the cluster, the strategies
resolved on the driver. The driver's peak (``tracemalloc``: Python objects and numpy arrays) and its
resident-memory growth are printed against the records' size on disk; LLaVA-NeXT's ``train.py`` instead
loads every record of every source into the driver's memory.
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc
from pathlib import Path

import ray

from jobs.console import quiet_ray_data
from jobs.perf.memory import PeakMemory

STRATEGIES = ("all", "first:10%", "end:1000", "random:50%")


def write_sources(folder: Path, sources: int, rows: int) -> Path:
    """``sources`` files of ``rows // sources`` records each and a data YAML over them; returns the YAML."""
    folder.mkdir(parents=True, exist_ok=True)
    per_source = rows // sources
    entries = []
    for s in range(sources):
        array = s % 4 == 3  # every fourth source a JSON array, the rest JSON lines
        path = folder / f"source_{s:03d}.{'json' if array else 'jsonl'}"
        records = ({"id": f"{s}-{i}", "image": f"images/{s}/{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": f"Object {i}."}]}
            for i in range(per_source))
        with path.open("w") as out:
            if array:
                out.write("[" + ",".join(json.dumps(r) for r in records) + "]")
            else:
                out.writelines(json.dumps(r) + "\n" for r in records)
        entries.append(f"  - json_path: {path}\n    sampling_strategy: {STRATEGIES[s % len(STRATEGIES)]}\n")
    mixture = folder / "mixture.yaml"
    mixture.write_text("datasets:\n" + "".join(entries))
    return mixture


def main(argv: list[str] | None = None) -> float | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sources", type=int, default=100)
    parser.add_argument("--rows", type=int, default=4_000_000)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-mixture"))
    parser.add_argument("--quick", action="store_true", help="10 sources, 100,000 records")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.sources, args.rows = 10, 100_000
    if args.dry_run:
        print(f"dry run: {args.sources} sources, {args.rows:,} records, strategies {', '.join(STRATEGIES)}")
        return None
    from pipelines.sources import plan_sources

    started = time.perf_counter()
    mixture = write_sources(args.out / f"{args.sources}x{args.rows}", args.sources, args.rows)
    on_disk = sum(p.stat().st_size for p in mixture.parent.glob("source_*"))
    print(f"wrote {args.sources} sources, {args.rows:,} records, {on_disk / 2**20:,.0f} MiB in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    quiet_ray_data()
    try:
        tracemalloc.start()
        started = time.perf_counter()
        with PeakMemory() as resident:
            plans = plan_sources([str(mixture)], seed=0)
        seconds = time.perf_counter() - started
        _, traced = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        ray.shutdown()
    taken = sum(plan.taken for plan in plans)
    print(f"planned {len(plans)} sources: {taken:,} of {sum(p.rows for p in plans):,} records taken, "
          f"{seconds:.1f} s")
    print(f"driver: peak Python/numpy allocations {traced / 2**20:.1f} MiB, resident growth "
          f"{(resident.peak - resident.start) / 2**20:.1f} MiB; the records on disk {on_disk / 2**20:,.0f} MiB")
    peak = traced / 2**20
    print(f"mixture plan driver-peak MiB at {len(plans)} sources x {sum(p.rows for p in plans):,} records: {peak:.1f}")
    return peak


if __name__ == "__main__":
    main()
