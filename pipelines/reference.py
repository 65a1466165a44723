"""The frozen reference policy's log-probabilities of preference rows, computed once in a Ray Data pass.

    rows = reference_logps(pair_rows, model=checkpoint, dtype="float32")   # + reference_chosen_logp,
                                                                            #   reference_rejected_logp

A DPO step compares the policy with its starting checkpoint on both answers of a pair. LLaVA-NeXT keeps a
second copy of the model for that, partitioned like the policy under ZeRO-3, and runs it every step. The
reference never changes, so here an actor pool runs it once over the preference rows before training
(``PREFERENCE_ROW_SCHEMA`` in, two float columns added) and the training step reads the numbers: no second
model in GPU memory and no second forward per step, at the cost of one pass over the data. Each actor loads
the checkpoint with transformers (``load_pretrained_llava``), collates its rows as training does
(``train.batches.collate_pairs``) and sums each answer's log-probabilities (``train.preference.sequence_logps``,
averaged per token for ``average``: IPO's rule).
"""

from __future__ import annotations

import numpy as np
import torch
from ray.data import ActorPoolStrategy

from llava_platform.data.image_settings import ImageSettings
from llava_platform.model.compose import load_pretrained_llava
from llava_platform.train.batches import collate_pairs
from llava_platform.train.preference import sequence_logps

REFERENCE_COLUMNS = ("reference_chosen_logp", "reference_rejected_logp")
"""What the pass adds to each preference row (float32): the reference policy's log-probability of each answer."""


class ReferenceScorer:
    """The per-actor callable: a batch of preference rows -> the same rows with ``REFERENCE_COLUMNS``."""

    def __init__(self, *, model: str, dtype: str, anyres: bool, average: bool):
        self.model, self.processor = load_pretrained_llava(model, dtype=getattr(torch, dtype))
        self.model.eval()
        self.settings = ImageSettings.from_processor(self.processor)
        self.anyres, self.average = anyres, average

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pairs = len(rows["id"])
        with torch.no_grad():
            inputs = collate_pairs(rows, self.processor, self.settings, self.anyres, device="cpu")
            logps = sequence_logps(self.model(**inputs).logits, inputs["labels"], average=self.average).float()
        return {**rows, REFERENCE_COLUMNS[0]: logps[:pairs].numpy(), REFERENCE_COLUMNS[1]: logps[pairs:].numpy()}


def reference_logps(rows, *, model: str, dtype: str = "float32", anyres: bool, average: bool = False,
                    num_actors: int | tuple[int, int] = 1, cpus_per_actor: float = 1.0, pairs_per_call: int = 4):
    """``rows`` (a Ray Dataset of ``pipelines.preprocess.PREFERENCE_ROW_SCHEMA``) with the reference ``model``'s
    log-probabilities (``REFERENCE_COLUMNS``).

    Args:
        model: the stage's starting checkpoint (a local folder).
        anyres: the checkpoint tiles anyres (LLaVA-NeXT's batch layout).
        average: per-token means (IPO) instead of sums.
    """
    low, high = num_actors if isinstance(num_actors, tuple) else (num_actors, num_actors)
    return rows.map_batches(ReferenceScorer, fn_constructor_kwargs=dict(model=model, dtype=dtype, anyres=anyres,
                                                                        average=average),
                            batch_format="numpy", batch_size=pairs_per_call,
                            compute=ActorPoolStrategy(min_size=low, max_size=high), num_cpus=cpus_per_actor)
