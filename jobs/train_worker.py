"""What each Ray Train worker runs: build the engine, resume if there is a checkpoint, train, checkpoint, export.

``train_loop_per_worker`` reads top to bottom; ``jobs.train`` resolves its ``StagePlan`` from the recipe
on the driver. Fault injection (a test facility, off by default) reaches the loop only through the
two hooks of ``jobs.faults.Faults``.

Each step's rows come from a ``jobs.train_steps.StepSource``: a preprocessed stage's rows by id in one
global order (the same rows and global batches at any worker count: an elastic group that lost
workers, or a resume on another count, continues exactly, with accumulation recomputed for its size,
``DeepSpeedSpec.at_world_size``), or a streamed stage's per-rank datasets. The checkpoint's
``TrainingPosition.data`` says where the run is in its data, so a restart skips exactly what it covers.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import ray.train
import torch
import torch.distributed as dist

from jobs.console import PROGRESS_EVERY_S, LineRelay, duration, quiet_ray_data, say, verbose
from jobs.faults import Faults
from jobs.train_steps import ShardSteps, StepSource, StreamedSteps
from llava_platform import registry, tracking
from llava_platform.data.image_settings import ImageSettings
from llava_platform.data.read_ahead import EpochReader
from llava_platform.storage import filesystem_for, is_mlflow_uri
from llava_platform.train.batches import (
    all_ranks_have,
    collate_preference,
    collate_rows,
    max_over_ranks,
    mean_over_ranks,
    normalise_loss,
    summed_over_ranks,
)
from llava_platform.train.checkpoint import export_model, save_trained_projector
from llava_platform.train.deepspeed_engine import (
    ResumeError,
    build_deepspeed_engine,
    forward,
    init_distributed,
    load_training_state,
    save_training_state,
    saved_world_size,
    train_step,
)
from llava_platform.train.plan import ResumePoint, StagePlan, TrainingPosition
from llava_platform.train.preference import METRICS as PREFERENCE_METRICS
from llava_platform.train.preference import PreferenceObjective, model_inputs

POSITION_FILE = "position.json"
"""Written by rank 0 into every checkpoint: stage, step, data position and MLflow run ids (read by ``--resume``)."""
EXPORT_CHECK_FILE = "export_check.pt"
"""One probe micro-batch and the trained engine's logits on it, to check that the export reproduces them."""
LOG_EVERY = 10
"""Optimizer steps between MLflow metric uploads (every step is logged, in batches)."""
READ_AHEAD_MICRO_BATCHES = 128
"""Micro-batches a worker reads ahead, across epoch boundaries (``EpochReader``)."""


def train_loop_per_worker(plan: StagePlan, faults: Faults, relay: LineRelay | None = None) -> None:
    """One Ray Train worker's stage (``jobs.train`` binds the arguments: ``partial(train_loop_per_worker, ...)``;
    ``relay`` takes this worker's lines to the driver's console)."""
    _RELAY[:] = [relay] if relay is not None else []
    init_distributed(plan.backend)  # joins Ray Train's process group
    quiet_ray_data()  # progress is rank 0's line (and MLflow); per-rank Ray Data bars would interleave
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    loop, track = plan.loop, plan.tracking
    world = dist.get_world_size()
    spec = plan.deepspeed.at_world_size(world, loop.global_batch_size)  # the global batch holds at any size
    accumulation = spec.gradient_accumulation_steps
    padding = accumulation * world - -(-loop.global_batch_size // loop.micro_batch_size)
    if rank == 0 and padding:
        log(rank, f"{world} workers: {padding} of {accumulation * world} micro-step slots per step are zero-weight "
                  f"padding (the global batch of {loop.global_batch_size} does not split evenly; pad_micro_batches)")
    position = TrainingPosition(plan.stage, data=plan.data)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and plan.resume_from:  # --resume: Ray Train has no checkpoint of this run yet
        filesystem, path = filesystem_for(plan.resume_from, plan.storage_endpoint_url)
        checkpoint = ray.train.Checkpoint(path, filesystem=filesystem)
    with contextlib.ExitStack() as stack:
        directory = stack.enter_context(checkpoint.as_directory()) if checkpoint is not None else None
        saved = saved_world_size(directory) if directory else world  # another count: a universal checkpoint
        with tempfile.TemporaryDirectory(prefix="llava-projector-") as download:
            engine, processor = build_deepspeed_engine(spec, resolve_projector(plan.projector, track.uri, download),
                                             universal_checkpoint=saved != world)
        if directory:
            position = load_training_state(engine, directory)
            if changed := position.data.differences(plan.data):
                raise ResumeError(f"the checkpoint's rows are not this stage's ({', '.join(changed)}): resuming would "
                                  "train other rows than it left off with")
            dist.barrier()  # nobody leaves (and deletes a downloaded copy) before everyone has loaded
            log(rank, f"resumed at step {position.step} (epoch {position.epoch}, {position.data.consumed} rows in)"
                      + (f", written by {saved} workers, now {world}" if saved != world else ""))

    interval = track.system_metrics_interval_s
    monitor = tracking.start_system_metrics(track.uri, track.run_id, interval) if rank == 0 and interval else None
    metrics_sender = None
    if rank == 0:  # a restart replays the steps after its checkpoint (or all): MLflow keeps their first record
        logged = tracking.last_logged_step(track.uri, track.run_id, "loss")
        metrics_sender = tracking.StepMetricSender(track.uri, track.run_id, skip_through_step=logged)
        if checkpoint is not None:
            tracking.log_metrics(track.uri, track.run_id, {"resumed_at_step": position.step}, step=position.step)
        # at every (re)start: an elastic run's size, and the global batch it trains with
        tracking.log_metrics(track.uri, track.run_id, {"world_size": world, "global_batch_size":
                                                       loop.global_batch_size}, step=position.step)
    pending: dict[int, dict[str, float]] = {}
    total_steps = spec.total_steps
    settings = ImageSettings.from_processor(processor)
    source = step_source(plan, rank, world, accumulation)
    start = position.data  # skip the steps of its epoch that the checkpoint covers
    reader = EpochReader(lambda epoch: source.epoch(epoch, skip=start.steps_in_epoch if epoch == start.epoch else 0),
                         first_epoch=position.epoch, epochs=loop.epochs,
                         depth=max(2, READ_AHEAD_MICRO_BATCHES // accumulation))
    probe = None
    varlen = spec.attn_implementation.startswith("flash")  # packed rows: flash-attention's varlen arguments
    objective = PreferenceObjective(plan.preference) if plan.preference else None  # stage 3: DPO on pairs
    ledger = faults.row_ledger(position.step, rank, world)  # a test facility: off unless armed

    checkpointed_step, first_step = position.step, position.step
    started = printed = time.perf_counter()
    while position.epoch < loop.epochs and position.step < total_steps:
        epoch, steps = position.epoch, reader.items(position.epoch)
        step_started = time.perf_counter()  # wall time between steps: a step's logging counts towards the next
        while position.step < total_steps:
            waited = time.perf_counter()
            step = next(steps, None)
            waited = time.perf_counter() - waited
            if not all_ranks_have(step is not None, device):
                break  # the epoch's rows are done (a streamed rank's first): everyone ends it together
            if objective is None:
                batches = [collate_rows(rows, processor, settings, loop.anyres, device, varlen=varlen)
                           for rows in step.rows]
                weights = normalise_loss(batches, step.weights, loop.token_mean_loss, device)
            else:  # each pair weighs the same: the micro-batches' means, averaged (padding weighs 0)
                batches = [collate_preference(rows, processor, settings, loop.anyres, device) for rows in step.rows]
                weights = list(step.weights)
            probe = probe or model_inputs(batches[0])
            result = train_step(engine, batches, weights, objective)
            position = position.after_step(step.global_units)
            ledger.record(position.step, epoch, step.trained_ids)
            faults.after_step(position.step, rank)
            trained = [rows for rows, weight in zip(step.rows, weights, strict=True) if weight > 0]
            samples, tokens, loss_sum, micro_batches, forward_s = summed_over_ranks(
                [sum(len(rows["id"]) for rows in trained), sum(row_tokens(rows) for rows in trained),
                 result.loss * result.micro_batches, result.micro_batches, result.forward_s], device)
            slowest = max_over_ranks(result.forward_s, device)  # forward passes: each rank's own work
            step_time, step_started = time.perf_counter() - step_started, time.perf_counter()
            metrics = {
                # token_mean: each loss is its tokens' share of the global sum, scaled by the slot count
                "loss": loss_sum / (accumulation * world if loop.token_mean_loss else micro_batches),
                "grad_norm": result.grad_norm, "straggler_ratio": slowest * world / forward_s,
                "samples_per_s": samples / step_time, "tokens_per_s": tokens / step_time,
                "data_wait_fraction": waited / step_time, "epoch": epoch,
                **{f"lr/{group}": lr for group, lr in result.learning_rates.items()},
            }
            if objective is not None:  # rewards, margins, preference accuracy, the SFT term: over all ranks
                metrics.update(mean_over_ranks(result.metrics, result.micro_batches, PREFERENCE_METRICS, device))
            pending[position.step] = metrics
            checkpointed = position.step % loop.checkpoint_every == 0 or position.step == total_steps
            if rank == 0 and (checkpointed or time.perf_counter() - printed >= PROGRESS_EVERY_S):
                elapsed = time.perf_counter() - started
                log(rank, progress_line(position.step, total_steps, metrics, elapsed / (position.step - first_step)))
                printed = time.perf_counter()
            if checkpointed or len(pending) >= LOG_EVERY:
                if rank == 0:
                    metrics_sender.send(pending)
                    if checkpointed:
                        metrics_sender.flush()  # the checkpointed steps are in MLflow before the checkpoint
                pending = {}
            if checkpointed:
                stall = report_checkpoint(engine, position, plan, faults, metrics, rank)
                if rank == 0:
                    metrics_sender.send({position.step: {"checkpoint_stall_s": stall}})
                checkpointed_step = position.step
        if position.step < total_steps:
            position = position.next_epoch()
    reader.close()
    if checkpointed_step != position.step:  # the data ran out before total_steps
        report_checkpoint(engine, position, plan, faults, metrics, rank)

    if rank == 0:
        metrics_sender.send(pending)
        lost = metrics_sender.close()
        tracking.log_metrics(track.uri, track.run_id, {"tracking/lost_metric_entries": lost}, step=position.step)
    export_and_register(engine, processor, probe, position.step, plan, rank)
    if monitor is not None:
        monitor.finish()


def row_tokens(rows: dict) -> int:
    """Tokens a micro-batch's rows run through the model: both answers of preference rows."""
    return int(rows["length"].sum()) + int(rows["rejected_length"].sum() if "rejected_length" in rows else 0)


def progress_line(step: int, total: int, metrics: dict[str, float], seconds_per_step: float) -> str:
    """``step 1200/6000 (20%) loss 0.1358, 171 samples/s, 8 min 12 s left``: rank 0's progress line (stage 3 adds
    the step's pairs whose chosen answer gained more than the rejected one, and the mean reward margin)."""
    pairs = (f", pairs ranked right {metrics['rewards/accuracies']:.0%} (margin {metrics['rewards/margins']:.3f})"
             if "rewards/accuracies" in metrics else "")  # stage 3
    return (f"step {step}/{total} ({step / total:.0%}) loss {metrics['loss']:.4f}{pairs}, "
            f"{metrics['samples_per_s']:.0f} samples/s, {duration((total - step) * seconds_per_step)} left")


def resolve_projector(projector: str | None, tracking_uri: str, download_dir: str) -> str | None:
    """A local path for the stage's starting projector: ``runs:/`` URIs are downloaded into ``download_dir``."""
    if not is_mlflow_uri(projector):
        return projector
    import mlflow.artifacts

    return mlflow.artifacts.download_artifacts(artifact_uri=projector, dst_path=download_dir,
                                               tracking_uri=tracking_uri)


def step_source(plan: StagePlan, rank: int, world_size: int, accumulation: int) -> StepSource:
    """Rows by id from the shards (preprocessed stages), or this rank's streamed dataset."""
    if plan.loop.shards is not None:
        return ShardSteps(plan.loop, rank, world_size, accumulation)
    return StreamedSteps(plan.loop, ray.train.get_dataset_shard(f"rank{rank}"), accumulation)


def report_checkpoint(engine, position: TrainingPosition, plan: StagePlan, faults: Faults, metrics: dict,
                      rank: int) -> float:
    """Every rank saves its DeepSpeed shard into a local folder of the same name; Ray Train uploads and merges
    them in storage, in the background with ``async_upload`` (it deletes the folder when done). Returns how
    long training stood still for it (``checkpoint_stall_s`` in MLflow)."""
    started = time.perf_counter()
    directory = tempfile.mkdtemp(prefix="llava-ckpt-")  # not a context manager: an async upload outlives the call
    save_training_state(engine, directory, position)
    if rank == 0:
        saved = ResumePoint(position, mlflow_run_id=plan.tracking.run_id,
                            mlflow_parent_run_id=plan.tracking.parent_run_id, world_size=dist.get_world_size())
        (Path(directory) / POSITION_FILE).write_text(json.dumps(saved.as_dict(), indent=1))
    mode = ray.train.CheckpointUploadMode.ASYNC if plan.loop.async_upload else ray.train.CheckpointUploadMode.SYNC
    ray.train.report({"step": position.step, "loss": metrics["loss"]},
                     checkpoint=ray.train.Checkpoint.from_directory(directory),
                     checkpoint_dir_name=f"{plan.stage}-step{position.step:08d}", checkpoint_upload_mode=mode,
                     delete_local_checkpoint_after_upload=True, checkpoint_upload_fn=faults.upload(position.step, rank))
    return time.perf_counter() - started


def export_and_register(engine, processor, probe: dict | None, step: int, plan: StagePlan, rank: int) -> None:
    """Every rank takes part (ZeRO-3 gathers are collective); rank 0 writes the projector, the export (streamed
    one shard at a time) and the MLflow artifacts."""
    logits = None
    if probe is not None:  # every rank runs it: ZeRO-3 forwards are collective
        engine.eval()
        with torch.no_grad():
            logits = forward(engine, probe).logits[:, -16:].float().cpu()  # the tail: small even with a 150k vocabulary
    out, track, zero_stage = Path(plan.output), plan.tracking, plan.deepspeed.zero_stage
    projector = save_trained_projector(engine.module, out, zero_stage=zero_stage, write=rank == 0)
    if rank == 0:
        tracking.log_artifact(track.uri, track.run_id, projector)
        tracking.log_metrics(track.uri, track.run_id, {"optimizer_steps": step}, step=step)
    if not plan.export:
        return
    export = export_model(engine.module, processor, out, lora=plan.deepspeed.lora, zero_stage=zero_stage,
                          write=rank == 0, max_shard_size=plan.export_shard_bytes,
                          progress=lambda line: log(rank, f"export {line}"))
    if rank != 0:
        return
    if probe is not None:
        torch.save({"batch": {k: v.cpu() for k, v in probe.items()}, "logits": logits}, out / EXPORT_CHECK_FILE)
    if track.registered_model:
        version = registry.register_export(track.uri, track.run_id, export, track.registered_model)
        log(rank, f"exported {export}, registered as {track.registered_model} version {version}")
    else:
        log(rank, f"exported {export}")


_RELAY: list[LineRelay] = []
"""This worker process's relay to the driver's console (set at the start of its stage)."""


def log(rank: int, message: str) -> None:
    """One line on the worker's real stdout (its Ray log file; the driver's console too when Ray forwards
    worker output, ``LLAVA_RAY_PROGRESS=1``), and through the relay to the driver's console otherwise.
    (Ray Train patches ``print`` into its logger and, when another library has wrapped ``sys.stdout`` as
    MLflow does, also tees it to that stream: a plain ``print`` reached the console twice.)"""
    say(f"train rank {rank}", message, stream=sys.__stdout__)
    if _RELAY and not verbose():
        _RELAY[0].put(f"[train rank {rank}] {message}")
