"""The DeepSpeed side of a training worker: build the DeepSpeed engine, run one optimizer step, save and load its
state. (The training engine; the generation engines that answer requests are ``llava_platform.generation``'s.)

Nothing here knows Ray: ``jobs.train`` calls these from each Ray Train worker, and the training
benchmark calls the same functions from one bare process, so the two loops differ only in what
Ray Train adds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file

from llava_platform.archs import tiles_anyres
from llava_platform.data.conversation import IGNORE_INDEX
from llava_platform.model.compose import load_pretrained_llava, load_processor
from llava_platform.model.trainability import apply_lora, parameter_groups, set_trainable
from llava_platform.train.checkpoint import load_projector, projector_file
from llava_platform.train.deepspeed_config import build_lr_scheduler
from llava_platform.train.partitioned import fill_partitions, load_partitioned
from llava_platform.train.plan import DeepSpeedSpec, TrainingPosition

CHECKPOINT_TAG = "state"
"""DeepSpeed's tag (sub-folder) inside every periodic checkpoint directory."""


class ResumeError(ValueError):
    """A checkpoint that cannot continue this run."""


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did (this rank's share)."""

    loss: float
    """Mean loss over the step's real micro-batches on this rank (0 when it ran padding only)."""
    micro_batches: int
    """Real (non-zero-weight) micro-batches this rank ran."""
    grad_norm: float | None
    learning_rates: dict[str, float]
    """Learning rate per parameter group name (``projector``, ``language_model/no_decay``, ...)."""
    compute_s: float
    """Seconds of forward + backward + optimizer step (waits for other ranks in collectives included)."""
    forward_s: float
    """Seconds of the forward passes alone: this rank's share of the work (no ZeRO-2 collective runs in a
    forward, so a rank waiting for a slower one does not count; the straggler ratio compares it over ranks)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The objective's own metrics (``Objective``), summed over the real micro-batches (divide by
    ``micro_batches``)."""


class Objective(Protocol):
    """A training loss other than the model's own language-modelling loss (``train.preference``'s DPO)."""

    def __call__(self, forward: Callable[[dict[str, torch.Tensor]], Any],
                 batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The micro-batch's loss and metrics; ``forward`` runs the engine on model inputs."""


def init_distributed(backend: str) -> None:
    """Join the process group (Ray Train's, or ``torchrun``'s) through DeepSpeed.

    DeepSpeed compiles a shared-memory all-reduce op on CPU machines the first time a process group
    starts (about 45 s on 2 cores). Only its inference all-reduce uses it, so CPU training skips the
    build by marking the op unavailable (DeepSpeed keeps that table for the process).
    """
    import deepspeed
    import deepspeed.ops

    if backend == "gloo":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend)


def build_deepspeed_engine(spec: DeepSpeedSpec, projector_path: str | None = None, *,
                           universal_checkpoint: bool = False):
    """Load the starting checkpoint, choose what trains, and wrap it in a DeepSpeed engine.

    Under ZeRO-3 the model is built partitioned and each rank reads only its own slices of the
    checkpoint (``train.partitioned``); below ZeRO-3 every rank loads it whole.

    Args:
        spec: the model, what trains (``tunable``, ``lora``), learning rates, schedule and the DeepSpeed
            config (``build_deepspeed_config``; the optimizer and ZeRO settings come from it).
        projector_path: a stage-1 ``projector.safetensors`` to load on top, or ``None``.
        universal_checkpoint: the engine will resume from a checkpoint written by another number of
            workers (``load_training_state`` converts it to DeepSpeed's universal format; DeepSpeed reads
            that only when its config says so before ``initialize``).

    Returns:
        ``(engine, processor)``; ``engine.module`` is the transformers model (or its peft wrapper).
    """
    import deepspeed

    dtype = torch.bfloat16 if spec.precision == "bf16" else torch.float32
    if spec.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    keep_alive = None
    if spec.zero_stage == 3:  # partitioned from the start: no rank ever holds the whole model
        model, keep_alive = load_partitioned(spec.model_path, spec.deepspeed_config, dtype=dtype,
                                             attn_implementation=spec.attn_implementation)
        processor = load_processor(spec.model_path)
        if projector_path:
            fill_partitions(model, load_file(str(projector_file(projector_path))), strict=False)
    else:
        model, processor = load_pretrained_llava(spec.model_path, dtype=dtype,
                                                 attn_implementation=spec.attn_implementation)
        if projector_path:
            load_projector(model, projector_path)
    set_trainable(model, spec.tunable)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()  # frozen embeddings would otherwise cut the graph
    if spec.lora is not None:
        model = apply_lora(model, **asdict(spec.lora),
                           fully_trained=[part for part in spec.tunable if part != "language_model"])
    groups = parameter_groups(model.named_parameters(), lr=spec.lr, projector_lr=spec.projector_lr,
                              vision_tower_lr=spec.vision_tower_lr, weight_decay=spec.weight_decay)
    schedule = build_lr_scheduler(spec.scheduler, warmup_ratio=spec.warmup_ratio, total_steps=spec.total_steps)
    config = {**spec.deepspeed_config, "checkpoint": {"load_universal": True}} if universal_checkpoint \
        else spec.deepspeed_config
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config, lr_scheduler=schedule)
    del keep_alive  # transformers' ZeRO-3 switch (HfDeepSpeedConfig): needed until the engine exists
    return engine, processor


def forward(engine, batch: dict[str, torch.Tensor]):
    """The engine's forward pass on a collated micro-batch; the vision tower runs even without images.

    Every rank must run the same modules in the same order: under ZeRO-3 each module's weights are
    gathered collectively as it runs (after a start-of-forward collective on the whole model), the
    first step's module order is recorded and compared across ranks, and later steps prefetch by it;
    under ZeRO-2 every trainable weight's gradient is reduced across ranks. So a text-only
    micro-batch takes the order transformers' forward uses with images: a pre-hook on the inner
    ``LlavaModel`` / ``LlavaNextModel`` (the module whose forward embeds the tokens and runs the
    tower and projector; after DeepSpeed's own hook, which gathers that module's own weights such as
    NeXT's ``image_newline``) embeds the tokens, runs the tower and projector on a blank image and
    adds those features times zero (the values stay exact), then the model continues from
    ``inputs_embeds``. A hook on the outer model would run them before the inner modules are
    entered: another order, and the ranks' gathers and gradient reduce-scatters go out of step.

    OneVision has two visual paths (images, then a video), and transformers' forward, given
    ``inputs_embeds``, finds their placeholders by comparing embeddings with the token's embedding (one
    more ``embed_tokens`` call, only on the paths that run). So a OneVision micro-batch always takes the
    same order: the pre-hook embeds the tokens and runs both paths itself, the images' (or a blank
    image's) then the video's (or a blank one-frame video's), scattering real features into their
    placeholders by token id (``onevision_inputs_embeds``; the model's own feature functions), and
    the model continues from ``inputs_embeds`` (found by the two-rank ZeRO-3 test with a video on one
    rank and an image or text on the other).
    """
    onevision = engine.module.config.model_type == "llava_onevision"
    if "pixel_values" in batch and not onevision:
        return engine(**batch, use_cache=False)
    hook = _embed_onevision if onevision else _embed_with_blank_image
    handle = _multimodal_model(engine.module).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        return engine(**batch, use_cache=False)  # a cache would also turn off packed rows' attention masking
    finally:
        handle.remove()


def _multimodal_model(module):
    """The ``LlavaModel`` / ``LlavaNextModel`` / ``LlavaOnevisionModel`` inside the transformers model or its
    peft wrapper."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    return base.model


def _pop_input_ids(args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, tuple]:
    if "input_ids" in kwargs:  # LLaVA's outer model passes them by name, LLaVA-NeXT's by position
        return kwargs.pop("input_ids"), args
    return args[0], (None, *args[1:])


def _embed_with_blank_image(model, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    input_ids, args = _pop_input_ids(args, kwargs)
    embeds = model.get_input_embeddings()(input_ids)
    kwargs["inputs_embeds"] = embeds + 0.0 * _blank_image_features(model, embeds.device, embeds.dtype)
    return args, kwargs


def _embed_onevision(model, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    input_ids, args = _pop_input_ids(args, kwargs)
    visual = {name: kwargs.pop(name, None) for name in
              ("pixel_values", "image_sizes", "batch_num_images", "pixel_values_videos")}
    kwargs["inputs_embeds"] = onevision_inputs_embeds(model, input_ids, **visual)
    return args, kwargs


def onevision_inputs_embeds(model, input_ids: torch.Tensor, *, pixel_values: torch.Tensor | None = None,
                            image_sizes: torch.Tensor | None = None, batch_num_images: torch.Tensor | None = None,
                            pixel_values_videos: torch.Tensor | None = None) -> torch.Tensor:
    """OneVision's input embeddings, (batch, length, hidden), with every rank's module order fixed: tokens,
    then the images' features (or a blank image's, times zero), then the video's (or a blank video's).

    Args:
        model: the inner ``LlavaOnevisionModel``.
        input_ids: (batch, length) with ``<image>`` / ``<video>`` placeholders expanded.
        others: ``collate_onevision``'s visual tensors, or ``None``.

    Raises:
        ValueError: the placeholders and the features do not pair up (as transformers' own check).
    """
    embeds = model.get_input_embeddings()(input_ids)
    config = model.config
    if pixel_values is not None:
        features = model.get_image_features(pixel_values, image_sizes, batch_num_images=batch_num_images)
        embeds = _scatter(embeds, input_ids == config.image_token_id, torch.cat(features.pooler_output), "image")
    else:
        embeds = embeds + 0.0 * _blank_image_features(model, embeds.device, embeds.dtype)
    if pixel_values_videos is not None:
        features = model.get_video_features(pixel_values_videos).pooler_output.flatten(0, 1)
        embeds = _scatter(embeds, input_ids == config.video_token_id, features, "video")
    else:
        embeds = embeds + 0.0 * _blank_video_features(model, embeds.device, embeds.dtype)
    return embeds


def _scatter(embeds: torch.Tensor, mask: torch.Tensor, features: torch.Tensor, kind: str) -> torch.Tensor:
    if int(mask.sum()) != features.shape[0]:
        raise ValueError(f"{kind} features and {kind} tokens do not match: {int(mask.sum())} tokens, "
                         f"{features.shape[0]} features")
    return embeds.masked_scatter(mask[..., None].expand_as(embeds), features.to(embeds.device, embeds.dtype))


def supervised_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the loss counts in a collated micro-batch: labels other than -100 after the causal shift."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def train_step(engine, micro_batches: Sequence[dict[str, torch.Tensor]],
               weights: Sequence[float] | None = None, objective: Objective | None = None) -> StepResult:
    """One optimizer step: forward and backward over ``micro_batches`` (the accumulation), then step.

    Args:
        weights: each micro-batch's loss multiplier (default 1): ``data.position.RankShare.weights``, where
            padding slots (filler rows) weigh 0 and the real ones make the update the mean over the step's
            real micro-batches at every worker count.
        objective: the loss (default: the model's own, from the batch's ``labels``).
    """
    started = time.perf_counter()
    weights = [1.0] * len(micro_batches) if weights is None else list(weights)
    losses, forward_s, metrics = [], 0.0, {}
    for batch, weight in zip(micro_batches, weights, strict=True):
        began = time.perf_counter()
        if objective is None:
            loss, measured = forward(engine, batch).loss, {}
        else:
            loss, measured = objective(partial(forward, engine), batch)
        forward_s += time.perf_counter() - began
        engine.backward(loss * weight)  # x * 1.0 == x exactly: unweighted steps are unchanged
        engine.step()
        if weight > 0:
            losses.append(loss.item())
            for name, value in measured.items():
                metrics[name] = metrics.get(name, 0.0) + value
    norm = engine.get_global_grad_norm()
    names = [group.get("name", str(i)) for i, group in enumerate(engine.optimizer.param_groups)]
    return StepResult(
        loss=sum(losses) / len(losses) if losses else 0.0, micro_batches=len(losses),
        grad_norm=float(norm) if norm is not None else None,
        learning_rates=dict(zip(names, engine.get_lr(), strict=True)), compute_s=time.perf_counter() - started,
        forward_s=forward_s, metrics=metrics,
    )


def _blank_image_features(model, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The sum of the projected features of one blank image (a scalar that depends on tower and projector;
    for LLaVA-NeXT, one tile-sized image: its overview and grid tiles, packed with ``image_newline``)."""
    config = model.config
    size = config.vision_config.image_size
    if tiles_anyres(config.model_type):  # the same anyres slicing in both
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        tiles = image_size_to_num_patches((size, size), config.image_grid_pinpoints, size)  # what the model slices
        pixels = torch.zeros(1, tiles, 3, size, size, device=device, dtype=dtype)
        features = model.get_image_features(pixels, image_sizes=torch.tensor([[size, size]], device=device))
    else:
        features = model.get_image_features(torch.zeros(1, 3, size, size, device=device, dtype=dtype))
    features = getattr(features, "pooler_output", features)
    return sum(f.sum() for f in features) if isinstance(features, list | tuple) else features.sum()


def _blank_video_features(model, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The sum of OneVision's features of a blank one-frame video (tower, projector, pooling, newline)."""
    size = model.config.vision_config.image_size
    features = model.get_video_features(torch.zeros(1, 1, 3, size, size, device=device, dtype=dtype))
    return getattr(features, "pooler_output", features).sum()


def save_training_state(engine, directory: str | Path, position: TrainingPosition) -> None:
    """Write the full DeepSpeed state (weights, optimizer, scheduler), ``position`` and this rank's RNG state.

    Every rank calls it (collective). The random state makes dropout (e.g. LoRA's) replay exactly.

    Args:
        position: where the run is, returned by ``load_training_state``.
    """
    engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, client_state={"position": position.as_dict()})
    torch.save(_rng_state(), Path(directory) / CHECKPOINT_TAG / f"rng_rank{engine.global_rank}.pt")


def _rng_state() -> dict[str, Any]:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def saved_world_size(directory: str | Path) -> int:
    """How many workers wrote the DeepSpeed state in ``directory`` (one optimizer-state file each)."""
    return len(list((Path(directory) / CHECKPOINT_TAG).glob("*optim_states.pt")))


def load_training_state(engine, directory: str | Path) -> TrainingPosition:
    """Restore what ``save_training_state`` wrote into a freshly built engine; return the saved position.

    A checkpoint written by another number of workers is first converted to DeepSpeed's universal
    format (``ds_to_universal``: each weight's fp32 value and Adam moments, whole), from which every
    rank takes its new partition; the engine must have been built with ``universal_checkpoint``. The
    global batch holds (accumulation absorbs the new worker count); each rank's random state is
    restored only when the count is unchanged.

    Raises:
        ResumeError: the directory holds no DeepSpeed state of this layout, or the worker count changed
            and the engine was not built for a universal checkpoint.
    """
    import torch.distributed as dist

    if not (Path(directory) / CHECKPOINT_TAG).is_dir():
        raise ResumeError(f"{directory} holds no training state (no {CHECKPOINT_TAG}/ folder); pass a checkpoint "
                          "folder written by jobs.train (<storage>/<recipe>-<stage>/<stage>-step<N>)")
    world, saved = dist.get_world_size(), saved_world_size(directory)
    load_dir, tag = str(directory), CHECKPOINT_TAG
    if saved != world:
        if not engine.load_universal_checkpoint():
            raise ResumeError(f"{directory} was written by {saved} workers and this run has {world}: build the "
                              "engine with universal_checkpoint=True")
        load_dir, tag = to_universal(directory), UNIVERSAL_TAG
    groups = [{k: v for k, v in group.items() if k != "params"} for group in engine.optimizer.param_groups]
    try:
        path, client_state = engine.load_checkpoint(load_dir, tag=tag)
    except (FileNotFoundError, AssertionError, RuntimeError) as error:
        raise ResumeError(f"cannot resume from {directory}: {error}") from error
    if saved != world:
        # DeepSpeed's ZeRO-3 universal loader copies the first parameter group's settings (learning rate,
        # weight decay) into every group: put back each group's own (the scheduler then sets its rate)
        rates = engine.lr_scheduler.get_last_lr() if engine.lr_scheduler is not None else [g["lr"] for g in groups]
        for group, own, rate in zip(engine.optimizer.param_groups, groups, rates, strict=True):
            group.update({k: v for k, v in own.items() if k not in ("lr", "step")}, lr=rate)
        # ... and gives every ZeRO-3 sub-group's Adam state one shared ``step`` tensor, which torch's Adam then
        # increments in place once per sub-group per step (so the bias correction runs ahead): one copy each
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        for state in inner.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
    check_param_groups(engine.optimizer.param_groups, groups)
    if path is None:
        raise ResumeError(f"DeepSpeed found no checkpoint in {directory}/{CHECKPOINT_TAG}")
    rng_file = Path(directory) / CHECKPOINT_TAG / f"rng_rank{engine.global_rank}.pt"
    if saved == world and rng_file.exists():
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    try:
        return TrainingPosition.from_dict(client_state["position"])
    except ValueError as error:
        raise ResumeError(f"cannot resume from {directory}: {error}") from error


def check_param_groups(loaded: list[dict], own: list[dict]) -> None:
    """Every parameter group's hyperparameters (all but the scheduled rate and the step) are its own after a load.

    Raises:
        ResumeError: a group came back with another group's settings.
    """
    for group, expected in zip(loaded, own, strict=True):
        wrong = {k: (group.get(k), v) for k, v in expected.items() if k not in ("lr", "step", "initial_lr")
                 and group.get(k) != v}
        if wrong:
            raise ResumeError(f"parameter group {expected.get('name')!r} loaded with other settings: {wrong}")


UNIVERSAL_TAG = "universal"


def universal_folder(directory: str | Path) -> Path:
    """The node-local folder for ``directory``'s universal conversion, named after the checkpoint's path *and*
    its files (names, sizes, modification times): a newer checkpoint written at the same path (a rerun into
    the same output folder) is converted afresh, never served an older conversion."""
    import tempfile

    from llava_platform.storage import files_signature

    return Path(tempfile.gettempdir()) / f"llava-universal-{files_signature(Path(directory) / CHECKPOINT_TAG)}"


def to_universal(directory: str | Path) -> str:
    """Convert ``directory``'s DeepSpeed state to the universal format in a folder on this node; returns it.

    The first rank on each node converts (into a node-local folder named after the checkpoint, since
    the checkpoint itself may be read-only or shared), the others wait for it.
    """
    import os
    from types import SimpleNamespace

    import torch.distributed as dist
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    root = universal_folder(directory)
    if int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0 and not (root / UNIVERSAL_TAG / "zero").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        ds_to_universal(SimpleNamespace(input_folder=str(Path(directory) / CHECKPOINT_TAG),
                                        output_folder=str(root / UNIVERSAL_TAG), num_extract_workers=1,
                                        num_merge_workers=1, keep_temp_folder=False, strict=True,
                                        inject_missing_state=True))
    dist.barrier()
    return str(root)
