"""The preference-tuning (DPO) loss of LLaVA-NeXT's DPO stage, and the metrics its trainer logs.

    loss, metrics = preference_loss(policy_logits, labels, reference_chosen, reference_rejected, spec)
    # policy_logits: (2B, L, V), the chosen answers' rows first, then the rejected ones' (same order);
    # labels: (2B, L), -100 where no loss is taken; reference_*: (B,) the frozen reference's log-probs

The rules are those of LLaVA-NeXT's ``LLaVADPOTrainer`` (its vendored TRL 0.7.11 ``DPOTrainer``:
``get_batch_logps``, ``dpo_loss``, ``get_sft_loss``, ``get_batch_loss_metrics``), checked against that code run
on fixed inputs (``tests/fixtures/official_dpo``):

- a sequence's log-probability is the *sum* over its labelled tokens after the causal shift, in float32
  (the mean per token for ``ipo``);
- with ``z = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)`` a pair's loss is
  ``-logsigmoid(beta z) (1 - label_smoothing) - logsigmoid(-beta z) label_smoothing`` (``sigmoid``),
  ``(z - 1 / (2 beta))^2`` (``ipo``) or ``relu(1 - beta z)`` (``hinge``);
- the total is ``dpo_alpha x mean(pair losses) + gamma x the chosen answers' cross-entropy`` (the mean over
  all their labelled tokens): ``gamma`` weighs the SFT term (``dpo_ov7b.sh``: ``dpo_alpha`` 1, ``gamma`` 0);
- rewards are ``beta x (policy - reference)`` log-probs, detached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

LossType = Literal["sigmoid", "ipo", "hinge"]


@dataclass(frozen=True)
class PreferenceSpec:
    """The loss's settings (``config.schema``'s DPO section builds it)."""

    beta: float
    dpo_alpha: float
    """Weight of the preference term."""
    gamma: float
    """Weight of the SFT term: the chosen answers' token-mean cross-entropy."""
    label_smoothing: float
    """``sigmoid`` only: the assumed share of flipped preferences (conservative DPO)."""
    loss_type: LossType


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, *, average: bool = False) -> torch.Tensor:
    """(N,) log-probability of each row's labelled tokens: logits (N, L, V) predict labels (N, L) shifted by one.

    The sum over the tokens whose label is not -100, or their mean with ``average``.
    """
    targets, logits = labels[:, 1:], logits[:, :-1].float()
    mask = targets != -100
    token_logps = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(2)).squeeze(2) * mask
    return token_logps.sum(-1) / mask.sum(-1) if average else token_logps.sum(-1)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The cross-entropy of rows' labelled tokens, averaged over all of them (the causal shift applied)."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def pair_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
                reference_rejected: torch.Tensor, spec: PreferenceSpec) -> tuple[torch.Tensor, ...]:
    """``(losses, chosen rewards, rejected rewards)``, each (B,), from the four (B,) log-probabilities."""
    z = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    if spec.loss_type == "sigmoid":
        losses = -F.logsigmoid(spec.beta * z) * (1 - spec.label_smoothing) - F.logsigmoid(-spec.beta * z) * \
            spec.label_smoothing
    elif spec.loss_type == "ipo":
        losses = (z - 1 / (2 * spec.beta)) ** 2
    else:
        losses = torch.relu(1 - spec.beta * z)
    chosen = spec.beta * (policy_chosen - reference_chosen).detach()
    rejected = spec.beta * (policy_rejected - reference_rejected).detach()
    return losses, chosen, rejected


def preference_loss(policy_logits: torch.Tensor, labels: torch.Tensor, reference_chosen: torch.Tensor,
                    reference_rejected: torch.Tensor, spec: PreferenceSpec) -> tuple[torch.Tensor, dict[str, float]]:
    """The total loss of B pairs and the trainer's metrics (``losses/*``, ``rewards/*``, ``logps/*``,
    ``ref_logps/*``: means over the pairs). See the module docstring for the rows' order."""
    pairs = labels.shape[0] // 2
    logps = sequence_logps(policy_logits, labels, average=spec.loss_type == "ipo")
    policy_chosen, policy_rejected = logps[:pairs], logps[pairs:]
    losses, chosen, rejected = pair_losses(policy_chosen, policy_rejected, reference_chosen, reference_rejected, spec)
    sft = sft_loss(policy_logits[:pairs], labels[:pairs])
    total = spec.dpo_alpha * losses.mean() + spec.gamma * sft
    values = (losses.mean(), sft, total, chosen.mean(), rejected.mean(), (chosen > rejected).float().mean(),
              (chosen - rejected).mean(), policy_chosen.mean(), policy_rejected.mean(), reference_chosen.mean(),
              reference_rejected.mean())
    return total, {name: float(value.detach()) for name, value in zip(METRICS, values, strict=True)}


REFERENCE_COLUMNS = ("reference_chosen_logp", "reference_rejected_logp")
"""Stage 3's rows' reference log-probabilities of each answer (float32; ``pipelines.reference`` writes them)."""
REFERENCE_INPUTS = ("reference_chosen", "reference_rejected")
"""A preference batch's (B,) reference log-probabilities (``train.batches.collate_preference``); not model inputs."""
METRICS = ("losses/dpo", "losses/sft", "losses/total", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
           "rewards/margins", "logps/chosen", "logps/rejected", "ref_logps/chosen", "ref_logps/rejected")
"""What ``preference_loss`` measures, in this order (the trainer's names; MLflow gets them per step)."""


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A collated batch without what only the loss reads."""
    return {name: value for name, value in batch.items() if name not in REFERENCE_INPUTS}


@dataclass(frozen=True)
class PreferenceObjective:
    """The DPO objective of a training step (``deepspeed_engine.Objective``): the policy's forward pass on both
    answers of every pair, scored against the reference log-probabilities the batch carries."""

    spec: PreferenceSpec

    def __call__(self, forward: Callable[[dict[str, torch.Tensor]], Any],
                 batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logits = forward(model_inputs(batch)).logits
        return preference_loss(logits, batch["labels"], batch["reference_chosen"], batch["reference_rejected"],
                               self.spec)
