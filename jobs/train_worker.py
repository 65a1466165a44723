"""What each Ray Train worker runs: build the engine, resume if there is a checkpoint, train, checkpoint, export.

``train_loop_per_worker`` reads top to bottom; ``jobs.train`` builds its ``config`` from the recipe.
Rank ``r`` reads the dataset ``rank<r>``: its own slice of the records, preprocessed in a fixed order,
so that a restarted worker group replays exactly the same micro-batches and can skip the ones a
checkpoint already covers.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray.data
import ray.train
import torch
import torch.distributed as dist

from llava_platform import registry, tracking
from llava_platform.data.collate import collate
from llava_platform.data.grouping import regroup
from llava_platform.data.image_settings import ImageSettings
from llava_platform.data.read_ahead import EpochReader
from llava_platform.train.checkpoint import export_model, full_state_dict, save_projector
from llava_platform.train.engine import (
    build_engine,
    forward,
    init_distributed,
    load_training_state,
    save_training_state,
    train_step,
)

POSITION_FILE = "position.json"
"""Written by rank 0 into every checkpoint: stage, step, data position and MLflow run ids (read by ``--resume``)."""
EXPORT_CHECK_FILE = "export_check.pt"
"""One probe micro-batch and the trained engine's logits on it, to check that the export reproduces them."""
LOG_EVERY = 10
"""Optimizer steps between MLflow metric uploads (every step is logged, in batches)."""
READ_AHEAD_WINDOWS = 4
"""Grouping windows (32 micro-batches each) a worker reads ahead, across epoch boundaries (``EpochReader``)."""
FAULT_UPLOAD_S = 5.0
"""How long the interrupted upload (fault injection) takes before it dies: longer than Ray Train's controller
takes to collect the ranks' earlier reports (it polls every 2 s), as a real upload would, so that the previous
checkpoint is registered. A failure within that window after a report loses that checkpoint too (Known limits)."""


def train_loop_per_worker(config: dict[str, Any]) -> None:
    init_distributed(config["backend"])  # joins Ray Train's process group
    # Progress is this loop's step log (and MLflow); per-rank Ray Data bars would interleave on the driver.
    ray.data.DataContext.get_current().enable_progress_bars = False
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    with tempfile.TemporaryDirectory(prefix="llava-projector-") as download:
        projector = resolve_projector(config["projector"], config["tracking_uri"], download)
        engine, processor = build_engine(**config["engine"], projector_path=projector)
    position = {"stage": config["stage"], "step": 0, "epoch": 0, "steps_in_epoch": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config["resume_from"]:
        filesystem, path = config["resume_from"]
        checkpoint = ray.train.Checkpoint(path, filesystem=filesystem)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            position = load_training_state(engine, directory)
            dist.barrier()  # nobody leaves (and deletes a downloaded copy) before everyone has loaded
        log(rank, f"resumed at step {position['step']} (epoch {position['epoch']})")

    run_id, uri = config["mlflow_run_id"], config["tracking_uri"]
    interval = config["system_metrics_interval_s"]
    monitor = tracking.start_system_metrics(uri, run_id, interval) if rank == 0 and interval else None
    metrics_sender = None
    if rank == 0:  # a restart replays the steps after its checkpoint (or all): MLflow keeps their first record
        logged = tracking.last_logged_step(uri, run_id, "loss")
        metrics_sender = tracking.StepMetricSender(uri, run_id, skip_through_step=logged)
        if checkpoint is not None:
            tracking.log_metrics(uri, run_id, {"resumed_at_step": position["step"]}, step=position["step"])
    pending: dict[int, dict[str, float]] = {}
    accumulation = config["engine"]["deepspeed_config"]["gradient_accumulation_steps"]
    total_steps = config["engine"]["total_steps"]
    settings = ImageSettings.from_processor(processor)
    shard = ray.train.get_dataset_shard(f"rank{rank}")
    reader = EpochReader(lambda epoch: shard.iter_batches(batch_size=config["group_window"], batch_format="numpy"),
                         first_epoch=position["epoch"], epochs=config["epochs"], depth=READ_AHEAD_WINDOWS)
    probe = None

    checkpointed_step = position["step"]
    for epoch in range(position["epoch"], config["epochs"]):
        done_in_epoch = position["steps_in_epoch"]  # 0 unless resuming inside this epoch
        raw = micro_batch_rows(reader.items(epoch), config, epoch, skip=done_in_epoch * accumulation)
        batches = (collate_rows(rows, processor, settings, config["anyres"], device) for rows in raw)
        step_started = time.perf_counter()  # wall time between steps: a step's logging counts towards the next
        while position["step"] < total_steps:
            waited = time.perf_counter()
            step_batches = [b for _, b in zip(range(accumulation), batches, strict=False)]
            waited = time.perf_counter() - waited
            if not all_ranks_have(len(step_batches) == accumulation, device):
                break  # a rank ran out of data: everyone ends the epoch together (no hung collectives)
            probe = probe or step_batches[0]
            result = train_step(engine, step_batches)
            done_in_epoch += 1
            position = {**position, "step": position["step"] + 1, "epoch": epoch, "steps_in_epoch": done_in_epoch}
            inject_fault(config["faults"], position["step"], rank)
            samples, tokens, loss = summed_over_ranks([result.samples, result.tokens, result.loss], device)
            step_time, step_started = time.perf_counter() - step_started, time.perf_counter()
            metrics = {
                "loss": loss / dist.get_world_size(), "grad_norm": result.grad_norm,
                "samples_per_s": samples / step_time, "tokens_per_s": tokens / step_time,
                "data_wait_fraction": waited / step_time, "epoch": epoch,
                **{f"lr/{group}": lr for group, lr in result.learning_rates.items()},
            }
            pending[position["step"]] = metrics
            checkpointed = position["step"] % config["checkpoint_every"] == 0 or position["step"] == total_steps
            if checkpointed or len(pending) >= LOG_EVERY:
                if rank == 0:
                    log(rank, f"step {position['step']}/{total_steps} loss {metrics['loss']:.4f}")
                    metrics_sender.send(pending)
                    if checkpointed:
                        metrics_sender.flush()  # the checkpointed steps are in MLflow before the checkpoint
                pending = {}
            if checkpointed:
                report_checkpoint(engine, position, config, metrics, rank)
                checkpointed_step = position["step"]
        position = {**position, "epoch": epoch + 1, "steps_in_epoch": 0}
    reader.close()
    if checkpointed_step != position["step"]:  # the data ran out before total_steps
        report_checkpoint(engine, position, config, metrics, rank)

    if rank == 0:
        metrics_sender.send(pending)
        lost = metrics_sender.close()
        tracking.log_metrics(uri, run_id, {"tracking/lost_metric_entries": lost}, step=position["step"])
    export_and_register(engine, processor, probe, position["step"], config, rank)
    if monitor is not None:
        monitor.finish()


def resolve_projector(projector: str | None, tracking_uri: str, download_dir: str) -> str | None:
    """A local path for the stage's starting projector: ``runs:/`` URIs are downloaded into ``download_dir``."""
    if not projector or not projector.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        return projector
    import mlflow.artifacts

    return mlflow.artifacts.download_artifacts(artifact_uri=projector, dst_path=download_dir,
                                               tracking_uri=tracking_uri)


def micro_batch_rows(windows: Iterator[dict], config: dict[str, Any], epoch: int, *, skip: int) -> Iterator[dict]:
    """One epoch's micro-batches from its windows of rows, in a fixed order; the first ``skip`` are dropped."""
    rows = regroup(windows, config["micro_batch"], group=config["group_by_length"], seed=config["seed"] + epoch)
    for index, batch in enumerate(rows):
        if index >= skip:
            yield batch


def collate_rows(rows: dict, processor, settings: ImageSettings, anyres: bool, device) -> dict[str, torch.Tensor]:
    return collate(rows["input_ids"], rows["labels"], list(rows["tiles"]), list(rows["image_size"]),
                   pad_token_id=processor.tokenizer.pad_token_id, anyres=anyres, image_mean=settings.image_mean,
                   image_std=settings.image_std, device=device)


def all_ranks_have(flag: bool, device) -> bool:
    """Whether every rank's flag is true (a one-integer all-reduce)."""
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def summed_over_ranks(values: list[float], device) -> list[float]:
    """Each value summed over all ranks (one all-reduce)."""
    summed = torch.tensor(values, device=device, dtype=torch.float64)
    dist.all_reduce(summed)
    return summed.tolist()


def report_checkpoint(engine, position: dict[str, Any], config: dict[str, Any], metrics: dict, rank: int) -> None:
    """Every rank saves its DeepSpeed shard into a folder of the same name; Ray Train merges them in storage."""
    with tempfile.TemporaryDirectory(prefix="llava-ckpt-") as directory:
        save_training_state(engine, directory, position)
        if rank == 0:
            saved = {**position, "mlflow_run_id": config["mlflow_run_id"],
                     "mlflow_parent_run_id": config["mlflow_parent_run_id"], "world_size": dist.get_world_size()}
            (Path(directory) / POSITION_FILE).write_text(json.dumps(saved, indent=1))
        ray.train.report({"step": position["step"], "loss": metrics["loss"]},
                         checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=f"{config['stage']}-step{position['step']:08d}",
                         checkpoint_upload_fn=interrupted_upload(config["faults"], position["step"], rank))


def export_and_register(engine, processor, probe: dict | None, step: int, config: dict[str, Any], rank: int) -> None:
    """Gather the weights (collective), then rank 0 writes the projector, the export and the MLflow artifacts."""
    logits = None
    if probe is not None:  # every rank runs it: ZeRO-3 forwards are collective
        engine.eval()
        with torch.no_grad():
            logits = forward(engine, probe).logits[:, -16:].float().cpu()  # the tail: small even with a 150k vocabulary
    state = full_state_dict(engine, config["zero_stage"])
    if rank != 0:
        return
    out = Path(config["output"])
    projector = save_projector(state, out)
    uri, run_id = config["tracking_uri"], config["mlflow_run_id"]
    tracking.log_artifact(uri, run_id, projector)
    tracking.log_metrics(uri, run_id, {"optimizer_steps": step}, step=step)
    if not config["export"]:
        return
    export = export_model(state, processor, out, model_path=config["engine"]["model_path"],
                          lora=config["engine"]["lora"], module=engine.module)
    if probe is not None:
        torch.save({"batch": {k: v.cpu() for k, v in probe.items()}, "logits": logits}, out / EXPORT_CHECK_FILE)
    if config["register"]:
        version = registry.register_export(uri, run_id, export, config["registered_model"])
        log(rank, f"exported {export}, registered as {config['registered_model']} version {version}")
    else:
        log(rank, f"exported {export}")


def inject_fault(faults: list[dict[str, Any]], step: int, rank: int) -> None:
    """Fault injection for tests: SIGKILL this worker once, right after optimizer step ``fault['step']``
    on ``fault['rank']`` (``action: kill``), or stop it there until it is killed from outside (``action: hang``).

    A marker file makes each fault fire once, so the restarted worker group runs through. The kill is
    the same signal the kernel's OOM killer sends; nothing is cleaned up.
    """
    fault = firing(faults, step, rank, ("kill", "hang"))
    if fault is None:
        return
    mark_fault(fault, rank, step, f"{fault['action']} rank {rank} at step {step}")
    if fault["action"] == "hang":
        time.sleep(600)
    os.kill(os.getpid(), signal.SIGKILL)


def interrupted_upload(faults: list[dict[str, Any]], step: int, rank: int):
    """Fault injection (``action: checkpoint``): an upload function for ``ray.train.report`` that writes
    half of this rank's checkpoint files into storage, then SIGKILLs the worker: a worker lost in the
    middle of a checkpoint write, after the other ranks have written theirs. ``None`` when no fault fires.
    """
    fault = firing(faults, step, rank, ("checkpoint",))
    if fault is None:
        return None

    def write_half_then_die(checkpoint: ray.train.Checkpoint, checkpoint_dir_name: str) -> None:
        time.sleep(FAULT_UPLOAD_S)
        storage = ray.train.get_context().get_storage()
        destination = f"{storage.experiment_fs_path}/{checkpoint_dir_name}"
        files = sorted(path for path in Path(checkpoint.path).rglob("*") if path.is_file())
        written = [str(path.relative_to(checkpoint.path)) for path in files[:len(files) // 2]]
        for name in written:
            storage.storage_filesystem.create_dir(str(Path(destination, name).parent), recursive=True)
            with storage.storage_filesystem.open_output_stream(f"{destination}/{name}") as stream:
                stream.write((Path(checkpoint.path) / name).read_bytes())
        mark_fault(fault, rank, step, f"killed rank {rank} writing {checkpoint_dir_name}: "
                                      f"{len(written)} of {len(files)} files written", written=written)
        os.kill(os.getpid(), signal.SIGKILL)

    return write_half_then_die


def firing(faults: list[dict[str, Any]], step: int, rank: int, actions: tuple[str, ...]) -> dict[str, Any] | None:
    """The fault that fires now for this rank (one of ``actions``, not fired before), if any."""
    return next((fault for fault in faults if fault["action"] in actions and step == fault["step"]
                 and rank == fault["rank"] and not Path(fault["marker"]).exists()), None)


def mark_fault(fault: dict[str, Any], rank: int, step: int, what: str, **details: Any) -> None:
    """The marker file (JSON) that makes a fault fire once and tells the test what was done."""
    Path(fault["marker"]).write_text(json.dumps({"what": what, "pid": os.getpid(), "step": step, "at": time.time(),
                                                **details}))
    log(rank, f"fault injection: {what} (pid {os.getpid()})")


def log(rank: int, message: str) -> None:
    print(f"[train rank {rank}] {message}", flush=True)
