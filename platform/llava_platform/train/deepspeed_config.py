"""A recipe stage -> a DeepSpeed config dict. Flat arguments in, plain dict out (testable, printable).

The global batch is fixed by the recipe; gradient accumulation absorbs the worker count, so the
same recipe trains identically on 1 or 64 workers. Learning rates live in the parameter groups
(``model.trainability.parameter_groups``); ``build_lr_scheduler`` scales each group from its own rate.
"""

from __future__ import annotations

import math
from typing import Any

from llava_platform.data.position import micro_steps


class DeepSpeedConfigError(ValueError):
    """Settings that DeepSpeed cannot run."""


def build_deepspeed_config(
    *,
    global_batch_size: int,
    micro_batch_size: int,
    world_size: int,
    zero_stage: int,
    precision: str,
    offload_optimizer: bool,
    max_grad_norm: float,
    weight_decay: float,
    lr: float,
    use_gpu: bool,
    param_persistence_threshold: int = 100_000,
) -> dict[str, Any]:
    """The DeepSpeed config of one stage.

    Args:
        global_batch_size: samples per optimizer step over all workers.
        micro_batch_size: samples per forward pass on one worker.
        world_size: number of training workers.
        zero_stage: 0-3; 3 shards parameters (and gathers them at save time).
        precision: ``bf16``/``fp16`` on GPUs, ``fp32`` on CPU.
        offload_optimizer: keep optimizer state in CPU memory.
        max_grad_norm: gradient clipping.
        weight_decay, lr: AdamW defaults (groups override ``lr``).
        use_gpu: whether workers have GPUs.
        param_persistence_threshold: ZeRO-3 keeps parameters with fewer elements than this whole on
            every rank instead of sharding them (DeepSpeed's default, 100k).

    DeepSpeed's ``train_batch_size`` counts micro-batch slots, ``accumulation x micro x world_size``: the
    global batch in rows where it divides, more where the last slots are zero-weight padding
    (``data.position.micro_steps``; the recipe check allows that only with ``pad_micro_batches``).

    Raises:
        DeepSpeedConfigError: a ZeRO stage outside 0-3, half precision on CPU.
    """
    accumulation = micro_steps(global_batch_size, micro_batch_size, world_size)
    if zero_stage not in (0, 1, 2, 3):
        raise DeepSpeedConfigError(f"ZeRO stage must be 0, 1, 2 or 3, got {zero_stage}")
    if precision != "fp32" and not use_gpu:
        raise DeepSpeedConfigError(f"{precision} needs GPUs; use fp32 on CPU")
    zero: dict[str, Any] = {"stage": zero_stage, "overlap_comm": use_gpu, "contiguous_gradients": True}
    if zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        zero["stage3_param_persistence_threshold"] = param_persistence_threshold
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    return {
        "train_batch_size": accumulation * micro_batch_size * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        # torch's AdamW (fused on GPUs): DeepSpeed's FusedAdam would first JIT-compile an op (a minute, and
        # nvcc on every GPU node); ZeRO-Offload keeps DeepSpeed's CPU Adam, which it requires.
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay, "betas": [0.9, 0.999],
                                                  **({} if offload_optimizer else {"torch_adam": True,
                                                                                   "fused": use_gpu})}},
        "steps_per_print": 10**9,  # progress is reported by our loop and MLflow, not DeepSpeed's prints
        "wall_clock_breakdown": False,
    }



def build_lr_scheduler(name: str, *, warmup_ratio: float, total_steps: int):
    """A callable ``optimizer -> scheduler`` for ``deepspeed.initialize(lr_scheduler=...)``.

    transformers' schedules multiply each parameter group's own learning rate, so the projector,
    language model and vision tower keep their ratios. (DeepSpeed's ``WarmupLR``/``WarmupDecayLR``
    set one absolute rate for every group; its defaults would silently train at 1e-3.)
    """
    from transformers import get_scheduler

    names = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
    if name not in names:
        raise DeepSpeedConfigError(f"unknown scheduler {name!r}; allowed: {', '.join(names)}")
    warmup_steps = math.ceil(warmup_ratio * total_steps)
    return lambda optimizer: get_scheduler(names[name], optimizer, num_warmup_steps=warmup_steps,
                                           num_training_steps=total_steps)
