"""Typed plans that cross from the driver to the training workers: what a worker runs, resolved once.

``jobs.train`` resolves a recipe stage into a ``StagePlan`` on the driver (every derived value, such
as gradient accumulation and total steps, computed there) and hands it to each Ray Train worker;
nothing below the driver reads a recipe key by name. ``TrainingPosition`` is where a run is, saved
in every checkpoint and read back by a resumed run. All are frozen dataclasses: picklable, printable,
and the same on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from llava_platform.data.packing import PackingSpec
from llava_platform.data.position import DataPosition, micro_steps
from llava_platform.train.preference import PreferenceSpec


@dataclass(frozen=True)
class LoraSpec:
    """Adapters on the language model (``model.trainability.apply_lora``'s arguments)."""

    r: int
    alpha: int
    dropout: float
    target_modules: tuple[str, ...]


@dataclass(frozen=True)
class DeepSpeedSpec:
    """What ``deepspeed_engine.build_deepspeed_engine`` builds: the model, what trains, the optimiser and DeepSpeed
    (the training engine; the generation engines are ``llava_platform.generation``'s)."""

    model_path: str
    """The composed or pretrained LLaVA checkpoint (a local folder or a remote URI)."""
    tunable: tuple[str, ...]
    """Parts that train: ``projector``, ``language_model``, ``vision_tower``."""
    lora: LoraSpec | None
    lr: float
    projector_lr: float | None
    vision_tower_lr: float | None
    weight_decay: float
    scheduler: str
    warmup_ratio: float
    total_steps: int
    """Optimizer steps of the stage (the schedule's length)."""
    zero_stage: int
    precision: str
    """``fp32``, ``bf16`` or ``fp16``; bf16 loads the weights in bfloat16, the others in float32."""
    gradient_accumulation_steps: int
    """Micro-batches per optimizer step on each worker (``deepspeed_config.gradient_accumulation_steps``)."""
    deepspeed_config: dict[str, Any]
    """DeepSpeed's own JSON config (``build_deepspeed_config``), passed to ``deepspeed.initialize`` as is."""
    gradient_checkpointing: bool
    attn_implementation: str
    """transformers' attention kernel (``model.attn_implementation``)."""
    tf32: bool
    """Allow TF32 matmuls on CUDA (``deepspeed.tf32``)."""

    def at_world_size(self, world_size: int, global_batch_size: int) -> DeepSpeedSpec:
        """The same stage on ``world_size`` workers: the global batch of ``global_batch_size`` rows holds, and
        accumulation absorbs the change (``data.position.micro_steps``).

        Where the global batch does not divide into ``world_size`` x the micro-batch (the recipe check allows
        that only with ``pad_micro_batches``), the last slots are zero-weight padding: DeepSpeed's
        ``train_batch_size`` counts slots, ``accumulation x micro x world_size``, not rows.
        """
        config = self.deepspeed_config
        micro = config["train_micro_batch_size_per_gpu"]
        steps = micro_steps(global_batch_size, micro, world_size)
        return replace(self, gradient_accumulation_steps=steps,
                       deepspeed_config={**config, "gradient_accumulation_steps": steps,
                                         "train_batch_size": steps * micro * world_size})


@dataclass(frozen=True)
class ShardRows:
    """A preprocessed stage's rows, read by id (``pipelines.shards.RowReader``) in the global order of
    ``llava_platform.data.position``: the same rows and global batches at every worker count."""

    files: tuple[str, ...]
    """The Parquet shards, in manifest order."""
    block_sizes: tuple[int, ...]
    """Rows per row group over ``files`` (``ShardLayout``)."""
    window_blocks: int
    """Row groups shuffled together (``RowOrder.window_blocks``); each worker caches as many."""
    packing: PackingSpec | None = None
    """Pack rows (``data.packing``): the global and micro batch then count packs."""


@dataclass(frozen=True)
class LoopSpec:
    """How a worker walks through its rows."""

    epochs: int
    micro_batch_size: int
    global_batch_size: int
    """Rows per optimizer step, over all workers (at every worker count)."""
    group_by_modality_length: bool
    token_mean_loss: bool
    """Weigh every supervised token of a global batch the same (``loss: token_mean``), else every micro-batch."""
    seed: int
    """The recipe seed: the epoch orders (rows by id) or the regrouping of each epoch (``seed + e``, streamed)."""
    anyres: bool
    """Rows carry LLaVA-NeXT tile stacks (``image_mode: anyres``)."""
    checkpoint_every: int
    """Optimizer steps between checkpoints (the last step is always checkpointed)."""
    shards: ShardRows | None
    """Rows by id from preprocessed shards; ``None``: streamed, rank ``r`` reads the dataset ``rank<r>`` (its
    fixed part of the records, for this worker count only)."""
    group_window: int
    """Streamed: rows read at a time and regrouped into micro-batches (``data.grouping.regroup``)."""
    async_upload: bool = True
    """Upload checkpoints in the background (``checkpoint.upload: async``)."""


@dataclass(frozen=True)
class TrackingSpec:
    """Where a stage's metrics, artifacts and export go in MLflow."""

    uri: str
    run_id: str
    parent_run_id: str
    system_metrics_interval_s: float | None
    """Seconds between system-metric samples on rank 0; ``None``: none."""
    registered_model: str | None
    """Register the export under this name; ``None``: do not register."""


@dataclass(frozen=True)
class StagePlan:
    """Everything a Ray Train worker needs for one stage."""

    stage: str
    """``stage1``, ``stage2`` or ``stage3``."""
    output: str
    """The stage's output folder (projector, export, fault markers)."""
    deepspeed: DeepSpeedSpec
    loop: LoopSpec
    data: DataPosition
    """The stage's data at its start: what the order is drawn over; a checkpoint's must match it."""
    tracking: TrackingSpec
    projector: str | None
    """A projector to start from (a path or a ``runs:/`` URI), or ``None``."""
    export: bool
    """Write a Hugging Face export at the end (the last stage of the run)."""
    preference: PreferenceSpec | None
    """Stage 3: train on preference pairs with this loss (rows carry the reference log-probabilities);
    ``None``: the language-modelling loss."""
    export_shard_bytes: int
    """The export's largest file (``checkpoint.export_shard_mb``): the most weight memory its writer holds."""
    resume_from: str | None
    """A checkpoint to start from (local or ``s3://``) when Ray Train has none of its own."""
    storage_endpoint_url: str | None
    """S3-compatible endpoint for ``resume_from`` (``checkpoint.s3_endpoint_url``)."""
    backend: str
    """``gloo`` on CPU, ``nccl`` on GPUs."""


@dataclass(frozen=True)
class TrainingPosition:
    """Where a stage's run is: saved in every checkpoint, so a restart continues with exactly the next rows."""

    stage: str
    data: DataPosition
    """Where the stage is in its data (epoch, rows consumed, and what the order is drawn over)."""
    step: int = 0
    """Optimizer steps done."""

    @property
    def epoch(self) -> int:
        return self.data.epoch

    def after_step(self, units: int) -> TrainingPosition:
        """The position one optimizer step of ``units`` units (rows, or packs) further."""
        return replace(self, step=self.step + 1, data=self.data.after_step(units))

    def next_epoch(self) -> TrainingPosition:
        """The position at the start of the next epoch."""
        return replace(self, data=self.data.next_epoch())

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "step": self.step, "data": self.data.as_dict()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainingPosition:
        """From ``as_dict`` output (extra keys, such as a ``position.json``'s run ids, are ignored).

        Raises:
            ValueError: no data position (a checkpoint of a version before it was saved).
        """
        if "data" not in values:
            raise ValueError("the checkpoint holds no data position (written by an earlier version of jobs.train, "
                             "whose row order cannot be continued exactly); start the stage afresh")
        return cls(stage=values["stage"], step=int(values["step"]), data=DataPosition.from_dict(values["data"]))


@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint's ``position.json``: its position, the MLflow runs it logs into, and who wrote it."""

    position: TrainingPosition
    mlflow_run_id: str
    mlflow_parent_run_id: str
    world_size: int | None
    """Workers of the run that wrote it (ZeRO state is sharded per worker)."""

    def as_dict(self) -> dict[str, Any]:
        """The flat JSON layout of ``position.json``."""
        return {**self.position.as_dict(), "mlflow_run_id": self.mlflow_run_id,
                "mlflow_parent_run_id": self.mlflow_parent_run_id, "world_size": self.world_size}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ResumePoint:
        return cls(position=TrainingPosition.from_dict(values), mlflow_run_id=values["mlflow_run_id"],
                   mlflow_parent_run_id=values["mlflow_parent_run_id"], world_size=values.get("world_size"))
