"""The frozen reference policy's log-probabilities of preference rows, computed once in a Ray Data pass.

    scoring = ReferencePass(model=checkpoint, anyres=False, average=False, dtype="float32", replicas=1,
                            cpus_per_replica=1, gpus_per_replica=0, pairs_per_call=4)
    rows = scoring.run(pair_rows)          # + reference_chosen_logp, reference_rejected_logp (SCORED_SCHEMA)

A DPO step compares the policy with its starting checkpoint on both answers of a pair. LLaVA-NeXT keeps a
second copy of the model for that, partitioned like the policy under ZeRO-3, and runs it every step. The
reference never changes, so here an actor pool runs it once over the preference rows before training
(``PREFERENCE_ROW_SCHEMA`` in, two float columns added) and the training step reads the numbers: no second
model in GPU memory and no second forward per step, at the cost of one pass over the data (the memory plan
shows both, ``train.memory.reference_memory``). Under LoRA the starting checkpoint is the base with its adapters
disabled (they start at zero), so no copy is needed there either. Each actor loads the checkpoint with
transformers (``load_pretrained_llava``), collates its rows as training does (``train.batches.collate_pairs``)
and sums each answer's log-probabilities (``train.preference.sequence_logps``, averaged per token for
``average``: IPO's rule).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from ray.data import ActorPoolStrategy

from llava_platform.data.image_settings import ImageSettings
from llava_platform.model.compose import load_pretrained_llava
from llava_platform.storage import files_signature
from llava_platform.train.batches import collate_pairs
from llava_platform.train.preference import REFERENCE_COLUMNS, sequence_logps
from pipelines.preprocess import PREFERENCE_ROW_SCHEMA

SCORED_SCHEMA = pa.schema([*PREFERENCE_ROW_SCHEMA, *((name, pa.float32()) for name in REFERENCE_COLUMNS)])
"""Stage 3's preprocessed rows: preference rows with their reference log-probabilities."""


class ReferenceScorer:
    """The per-actor callable: a batch of preference rows -> the same rows with ``REFERENCE_COLUMNS``."""

    def __init__(self, *, model: str, dtype: str, anyres: bool, average: bool,
                 columns: tuple[str, str] = REFERENCE_COLUMNS):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.processor = load_pretrained_llava(model, dtype=getattr(torch, dtype))
        self.model.to(self.device).eval()
        self.settings = ImageSettings.from_processor(self.processor)
        self.anyres, self.average, self.columns = anyres, average, columns

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pairs = len(rows["id"])
        with torch.no_grad():
            inputs = collate_pairs(rows, self.processor, self.settings, self.anyres, device=self.device)
            logps = sequence_logps(self.model(**inputs, use_cache=False).logits, inputs["labels"],
                                   average=self.average).float().cpu()
        return {**rows, self.columns[0]: logps[:pairs].numpy(), self.columns[1]: logps[pairs:].numpy()}


@dataclass(frozen=True)
class ReferencePass:
    """How stage 3's reference log-probabilities are computed (``jobs.preprocess`` builds it from the recipe)."""

    model: str
    """The stage's starting checkpoint (a local folder): the frozen reference."""
    anyres: bool
    """The checkpoint tiles anyres (LLaVA-NeXT's batch layout)."""
    average: bool
    """Per-token means (IPO) instead of sums."""
    dtype: str
    """``float32``, ``bfloat16`` or ``float16``: the training stage's precision."""
    replicas: int
    cpus_per_replica: float
    gpus_per_replica: float
    pairs_per_call: int
    columns: tuple[str, str] = REFERENCE_COLUMNS
    """Where the chosen and the rejected answers' log-probabilities go."""

    def fingerprint(self) -> str:
        """What decides the numbers: the rule, the dtype and the checkpoint's files (names, sizes, times), so
        that shards scored by another model (a retrained stage 2 at the same path) are never reused."""
        return json.dumps({"average": self.average, "dtype": self.dtype,
                           "weights": files_signature(self.model, "*.safetensors")})

    def run(self, rows):
        """``rows`` (a Ray Dataset of ``PREFERENCE_ROW_SCHEMA``) with ``REFERENCE_COLUMNS`` added."""
        return rows.map_batches(
            ReferenceScorer, fn_constructor_kwargs=dict(model=self.model, dtype=self.dtype, anyres=self.anyres,
                                                        average=self.average, columns=self.columns),
            batch_format="numpy", batch_size=self.pairs_per_call,
            compute=ActorPoolStrategy(min_size=self.replicas, max_size=self.replicas),
            num_cpus=self.cpus_per_replica, num_gpus=self.gpus_per_replica or None)



POLICY_COLUMNS = ("policy_chosen_logp", "policy_rejected_logp")


@dataclass(frozen=True)
class PreferenceScores:
    """How a trained policy ranks held-out pairs against its reference (``preference_accuracy``)."""

    accuracy: float
    """Pairs whose implicit reward margin ``(policy - reference)(chosen) - (policy - reference)(rejected)`` is
    positive, ties counted half (DPO's ``rewards/accuracies``): 50 % for the reference itself, by construction."""
    policy_prefers_chosen: float
    """Pairs where the policy gives the chosen answer the higher log-probability (no reference involved)."""
    reference_prefers_chosen: float
    """The same for the reference: where the policy started."""
    mean_margin: float
    """Mean implicit reward margin (beta = 1)."""
    pairs: int

    def as_metrics(self) -> dict[str, float]:
        return {"preference/accuracy": self.accuracy, "preference/policy_prefers_chosen": self.policy_prefers_chosen,
                "preference/reference_prefers_chosen": self.reference_prefers_chosen,
                "preference/mean_margin": self.mean_margin, "preference/pairs": self.pairs}


def preference_accuracy(rows, *, policy: ReferencePass, reference: ReferencePass) -> PreferenceScores:
    """Score preference rows (``PREFERENCE_ROW_SCHEMA``, a Ray Dataset) with both models (two passes) and compare."""
    scored = policy.run(reference.run(rows)).select_columns([*REFERENCE_COLUMNS, *POLICY_COLUMNS]).to_pandas()
    if scored.empty:
        raise ValueError("no preference pair survived preprocessing; see the quarantine")
    chosen = scored[POLICY_COLUMNS[0]] - scored[REFERENCE_COLUMNS[0]]
    rejected = scored[POLICY_COLUMNS[1]] - scored[REFERENCE_COLUMNS[1]]
    margin = (chosen - rejected).to_numpy()
    return PreferenceScores(
        accuracy=float(np.mean((margin > 0) + 0.5 * (margin == 0))),
        policy_prefers_chosen=float(np.mean(scored[POLICY_COLUMNS[0]] > scored[POLICY_COLUMNS[1]])),
        reference_prefers_chosen=float(np.mean(scored[REFERENCE_COLUMNS[0]] > scored[REFERENCE_COLUMNS[1]])),
        mean_margin=float(margin.mean()), pairs=len(margin))
