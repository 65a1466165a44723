"""A training step's micro-batches on one rank, Ray-free: rows -> model batches, the loss weights that make
every supervised token of a global batch weigh the same, and the small all-reduces the loop needs.

    batches = [collate_rows(rows, processor, settings, anyres, device) for rows in step.rows]
    pairs = collate_pairs(preference_rows, processor, settings, anyres, device)   # chosen B, then rejected B
    scored = collate_preference(scored_rows, processor, settings, anyres, device) # + the reference log-probs
    weights = normalise_loss(batches, share.weights, token_mean=True, device=device)
    result = train_step(engine, batches, weights)

``jobs.train_worker`` (under Ray Train), the GPU smoke test and the packing benchmark (plain processes)
use the same functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from llava_platform.data.collate import collate, collate_onevision, pack_tokens
from llava_platform.data.image_settings import ImageSettings
from llava_platform.train.deepspeed_engine import supervised_tokens
from llava_platform.train.preference import REFERENCE_COLUMNS, REFERENCE_INPUTS


def collate_rows(rows: dict, processor, settings: ImageSettings, anyres: bool, device, *,
                 varlen: bool = False) -> dict[str, torch.Tensor]:
    """A micro-batch's rows as the model takes them; with ``pack_sizes`` (packing) its samples packed into rows
    (``collate.pack_tokens``: restarting positions, no attention mask; ``varlen``: flash-attention's arguments)."""
    pad = processor.tokenizer.pad_token_id
    if settings.onevision:
        batch = collate_onevision(rows["input_ids"], rows["labels"], list(rows["tiles"]), list(rows["image_sizes"]),
                                  list(rows["frames"]), pad_token_id=pad, image_mean=settings.image_mean,
                                  image_std=settings.image_std, device=device)
    else:
        batch = collate(rows["input_ids"], rows["labels"], list(rows["tiles"]), list(rows["image_size"]),
                        pad_token_id=pad, anyres=anyres, image_mean=settings.image_mean,
                        image_std=settings.image_std, device=device)
    if "pack_sizes" in rows:
        del batch["attention_mask"]
        batch.update(pack_tokens(rows["input_ids"], rows["labels"], rows["pack_sizes"], pad_token_id=pad,
                                 varlen=varlen, device=device))
    return batch


def collate_pairs(rows: dict, processor, settings: ImageSettings, anyres: bool, device) -> dict[str, torch.Tensor]:
    """A micro-batch of preference rows (``PREFERENCE_ROW_SCHEMA``) as one model batch of 2B sequences: the
    chosen answers' B rows first, then the rejected answers' in the same order, each pair on the same media
    (``train.preference.preference_loss`` takes them in this order)."""
    doubled = {name: list(values) * 2 for name, values in rows.items()}
    doubled["input_ids"] = list(rows["input_ids"]) + list(rows["rejected_input_ids"])
    doubled["labels"] = list(rows["labels"]) + list(rows["rejected_labels"])
    return collate_rows(doubled, processor, settings, anyres, device)


def collate_preference(rows: dict, processor, settings: ImageSettings, anyres: bool,
                       device) -> dict[str, torch.Tensor]:
    """``collate_pairs`` of stage 3's rows, with their reference log-probabilities (``reference_chosen``,
    ``reference_rejected``: (B,) float32, from the rows' ``REFERENCE_COLUMNS``)."""
    batch = collate_pairs(rows, processor, settings, anyres, device)
    for name, column in zip(REFERENCE_INPUTS, REFERENCE_COLUMNS, strict=True):
        batch[name] = torch.as_tensor(rows[column], dtype=torch.float32, device=device)
    return batch


def normalise_loss(batches: list[dict], weights: tuple[float, ...], token_mean: bool, device) -> list[float]:
    """Each micro-batch's loss weight. ``token_mean``: every supervised token of the global batch weighs the same:
    the model sums its tokens' cross-entropies and divides by ``num_items_in_batch`` = the global batch's
    supervised tokens / the slot count (DeepSpeed divides by accumulation and averages over ranks), so the
    update is the global sum over the global count; padding slots weigh 0. Otherwise ``weights`` as given
    (each micro-batch's own mean, ``RankShare.weights``)."""
    if not token_mean:
        return list(weights)
    mine = sum(supervised_tokens(batch) for batch, w in zip(batches, weights, strict=True) if w > 0)
    total = summed_over_ranks([mine], device)[0]
    slots = len(batches) * dist.get_world_size()
    for batch in batches:
        batch["num_items_in_batch"] = torch.tensor(max(total, 1.0) / slots, device=device)
    return [1.0 if w > 0 else 0.0 for w in weights]


def all_ranks_have(flag: bool, device) -> bool:
    """Whether every rank's flag is true (a one-integer all-reduce)."""
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def max_over_ranks(value: float, device) -> float:
    value = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item()


def mean_over_ranks(sums: dict[str, float], count: int, names: Sequence[str], device) -> dict[str, float]:
    """Per-micro-batch metrics ``names`` (``sums`` over this rank's ``count`` real micro-batches; none on a rank
    that ran padding only) as means over every rank's real micro-batches (one all-reduce)."""
    totals = summed_over_ranks([count, *(sums.get(name, 0.0) for name in names)], device)
    return {name: value / max(totals[0], 1.0) for name, value in zip(names, totals[1:], strict=True)}


def summed_over_ranks(values: list[float], device) -> list[float]:
    """Each value summed over all ranks (one all-reduce)."""
    summed = torch.tensor(values, device=device, dtype=torch.float64)
    dist.all_reduce(summed)
    return summed.tolist()
