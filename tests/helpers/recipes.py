"""Recipe overrides that run ``tiny_cpu_demo`` on a few records in tests (the demo's learning is the
demo's job; the tests use the smallest sizes that still take every code path)."""

from __future__ import annotations

from pathlib import Path

RECIPE = "tiny_cpu_demo"
REGISTERED_NAME = "tiny-cpu-demo"
"""The recipe's name: its MLflow experiment, registered model and checkpoint folder prefix."""
STEPS = 4
"""Optimizer steps per stage; checkpoints every 2, so a fault at step 3 or 4 has one to resume from."""
NEXT_MODEL = ["model.arch=llava_next", "model.image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]]",
              "stage1.data.image_mode=anyres", "stage2.data.image_mode=anyres"]
"""The tiny recipe as LLaVA-NeXT (anyres tiles, image newline), as the end-to-end job runs it."""


def data_overrides(data: Path) -> list[str]:
    """Both stages and the evaluation read the synthetic dataset in ``data``."""
    return [f"stage1.data.train_files=[{data / 'stage1.json'}]", f"stage2.data.train_files=[{data / 'stage2.jsonl'}]",
            f"stage1.data.image_root={data}", f"stage2.data.image_root={data}",
            f"evaluation.data_files=[{data / 'eval.jsonl'}]", f"evaluation.image_root={data}"]


def tiny_pipeline_overrides(root: Path, records: int = 24, eval_records: int = 8, steps: int = 2) -> list[str]:
    """``tiny_cpu_demo``'s whole pipeline on a few records below ``root``: stage 1 streamed into the
    workers, stage 2 from ``jobs.preprocess``'s Parquet shards."""
    data = root / "data"
    return [
        f"synthetic.out_dir={data}", f"synthetic.train_records={records}", f"synthetic.eval_records={eval_records}",
        *data_overrides(data), "stage1.data.preprocessed=null", f"stage2.data.preprocessed={root / 'shards2'}",
        f"stage1.max_steps={steps}", f"stage2.max_steps={steps}", "stage1.global_batch_size=4",
        "stage1.micro_batch_size=2", "stage2.global_batch_size=4", "stage2.micro_batch_size=2",
        "stage1.optim.lr=0.01", "checkpoint.every_n_steps=2", "tracking.system_metrics_interval_s=1",
        "stage2.tunable=[projector,language_model]",  # the frozen tower is one of the job's checks
    ]


def zero3(*stages: str) -> list[str]:
    """ZeRO-3 for ``stages``, with every weight of the tiny model sharded (no persistence threshold)."""
    return [override for stage in stages for override in (
        f"{stage}.deepspeed.zero_stage=3", f"{stage}.deepspeed.zero3_param_persistence_threshold=0")]


ONEVISION_RECIPE = "tiny_onevision_cpu"
ONEVISION_FRAMES = 4
"""Frames per video in the tiny OneVision recipe (``data.video.frames``, ``evaluation.video_frames``)."""


def onevision_pipeline_overrides(root: Path, tracking_uri: str) -> list[str]:
    """``tiny_onevision_cpu``'s whole pipeline on a few records of each kind (one image, two images, a
    video) below ``root``: stage 1 streamed, stage 2 from a three-source data YAML (one source per kind) through
    ``jobs.preprocess``'s Parquet shards, packed
    (several samples of any kind in one row; the global batch counts packs)."""
    data = root / "data"
    return [
        f"synthetic.out_dir={data}", "synthetic.train_records=18", "synthetic.caption_records=8",
        "synthetic.eval_records=9", *data_overrides(data), f"stage2.data.train_files=[{data / 'stage2_mixture.yaml'}]",
        f"stage2.data.preprocessed={root / 'shards2'}",
        "stage1.max_steps=1", "stage2.max_steps=2", "stage1.global_batch_size=4", "stage1.micro_batch_size=2",
        "stage2.global_batch_size=2", "stage2.micro_batch_size=1", "stage2.data.materialize=false",
        "stage2.data.packing={max_tokens: 1024}", "stage2.data.group_by_modality_length=false",  # packs of kinds
        "checkpoint.every_n_steps=3", "evaluation.batch_size=9", "evaluation.score_stage1=false",
        f"tracking.uri={tracking_uri}", "tracking.system_metrics=false",
        "scaling.num_workers=1",  # two ranks of OneVision batches: test_zero3_mixed_batches.py
    ]


DPO_RECIPE = "tiny_dpo_cpu"
DPO_STEPS = 3
"""Stage 3's optimizer steps in the end-to-end DPO run (checkpoints every 2: one to resume from)."""


def write_preference_pairs(data: Path, out: Path) -> dict[str, int]:
    """Stage 3's training file: the synthetic pairs on images in ``data``, text-only pairs (so that ranks meet
    image and text pairs), and one bad record per quarantine reason; returns the count by kind."""
    import json

    good = [json.loads(line) for line in (data / "preference.jsonl").read_text().splitlines()]
    text = [{"id": f"text-{i}", "prompt": f"What is {i} plus {i}?", "chosen": str(2 * i), "rejected": str(2 * i + 1)}
            for i in range(8)]
    bad = [{"id": "bad-missing", "image": good[0]["image"], "prompt": "What colour?", "chosen": "Red."},
           {"id": "bad-same", "prompt": "Pick one.", "chosen": "Red.", "rejected": " Red. "},
           {"id": "bad-long", "prompt": "word " * 400, "chosen": "Yes.", "rejected": "No."}]
    out.write_text("".join(json.dumps(r) + "\n" for r in [*good, *text, *bad]))
    return {"image": len(good), "text": len(text), "bad": len(bad)}


def dpo_pipeline_overrides(root: Path, tracking_uri: str) -> list[str]:
    """``tiny_dpo_cpu``'s whole pipeline on a few records below ``root``: stage 1 streamed, stage 2 from shards,
    stage 3 on ``root/pairs.jsonl`` (``write_preference_pairs``) under ZeRO-3 on two ranks, every weight sharded;
    the evaluation scores stage 2 and stage 3 and the held-out preference pairs."""
    data = root / "data"
    return [
        f"synthetic.out_dir={data}", "synthetic.train_records=24", "synthetic.eval_records=4", *data_overrides(data),
        f"stage3.data.train_files=[{root / 'pairs.jsonl'}]", f"stage3.data.image_root={data}",
        f"stage3.data.preprocessed={root / 'shards3'}",
        f"evaluation.preference_files=[{data / 'preference_eval.jsonl'}]",
        "stage1.data.preprocessed=null", f"stage2.data.preprocessed={root / 'shards2'}",
        "stage1.max_steps=1", "stage2.max_steps=1", f"stage3.max_steps={DPO_STEPS}",
        "stage1.global_batch_size=4", "stage1.micro_batch_size=2", "stage2.global_batch_size=4",
        "stage2.micro_batch_size=2", "stage3.global_batch_size=4", "stage3.micro_batch_size=1", *zero3("stage3"),
        "checkpoint.every_n_steps=2", "evaluation.batch_size=4", "evaluation.score_stage1=false",
        f"tracking.uri={tracking_uri}", "tracking.system_metrics=false",
    ]
