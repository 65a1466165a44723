"""The DPO loss (``train.preference``) against LLaVA-NeXT's own trainer code run on fixed inputs
(``tests/fixtures/official_dpo``): per-pair losses, rewards, the SFT term, the total and its gradients."""

from __future__ import annotations

import json

import pytest
import torch

from llava_platform.train.preference import PreferenceSpec, pair_losses, preference_loss, sequence_logps, sft_loss
from tests.helpers import REPO_ROOT

EXPECTED = json.loads((REPO_ROOT / "tests" / "fixtures" / "official_dpo" / "expected.json").read_text())
A, B = EXPECTED["fixture_A"], EXPECTED["fixture_B"]


def spec_of(case: dict) -> PreferenceSpec:
    h = case["hyperparameters"]
    return PreferenceSpec(beta=h["beta"], dpo_alpha=h["dpo_alpha"], gamma=h["gamma"],
                          label_smoothing=h["label_smoothing"], loss_type=h["loss_type"])


def close(actual, expected):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(A["cases"]))
def test_pair_losses_rewards_and_gradients_are_the_official_ones(name):
    case, inputs = A["cases"][name], {k: torch.tensor(v) for k, v in A["inputs"].items()}
    spec = spec_of(case)
    chosen, rejected = (inputs["policy_chosen_logps"].requires_grad_(), inputs["policy_rejected_logps"]
                        .requires_grad_())
    losses, chosen_rewards, rejected_rewards = pair_losses(chosen, rejected, inputs["reference_chosen_logps"],
                                                           inputs["reference_rejected_logps"], spec)
    sft = sft_loss(inputs["chosen_logits"], inputs["chosen_labels"].long())
    total = spec.dpo_alpha * losses.mean() + spec.gamma * sft
    total.backward()
    close(losses, case["per_pair_dpo_losses"])
    close(chosen_rewards, case["chosen_rewards"])
    close(rejected_rewards, case["rejected_rewards"])
    close(sft, case["sft_loss_unscaled"])
    close(total, case["loss"])
    close(chosen.grad, case["grad_policy_chosen_logps"])
    close(rejected.grad, case["grad_policy_rejected_logps"])


@pytest.mark.parametrize("name", sorted(B["cases"]))
def test_the_loss_from_token_logits_is_the_official_one(name):
    """End to end: chosen rows then rejected rows, labels -100 on the prompt and the padding."""
    case, inputs = B["cases"][name], B["inputs"]
    spec = spec_of(case)
    labels = torch.tensor(inputs["chosen_labels"] + inputs["rejected_labels"])
    policy = torch.tensor(inputs["policy_logits"], requires_grad=True)
    average = spec.loss_type == "ipo"
    reference = sequence_logps(torch.tensor(inputs["ref_logits"]), labels, average=average)
    pairs = len(inputs["chosen_labels"])
    loss, metrics = preference_loss(policy, labels, reference[:pairs], reference[pairs:], spec)
    loss.backward()
    close(loss, case["loss"])
    close(reference[:pairs], case["reference_chosen_logps"])
    close(reference[pairs:], case["reference_rejected_logps"])
    close(sequence_logps(policy.detach(), labels, average=average), case["policy_chosen_logps"]
          + case["policy_rejected_logps"])
    close(policy.grad, case["grad_policy_logits"])
    for key, value in case["metrics"].items():
        if key in metrics:
            close(metrics[key], value)
    assert {"losses/dpo", "losses/sft", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
            "rewards/margins"} <= set(metrics) & set(case["metrics"])


def test_a_wrong_rule_disagrees():
    """A negative control: mean log-probs under sigmoid (instead of sums) give another loss."""
    case, inputs = B["cases"]["gamma0"], B["inputs"]
    labels = torch.tensor(inputs["chosen_labels"] + inputs["rejected_labels"])
    policy, reference = (sequence_logps(torch.tensor(inputs[k]), labels, average=True)
                         for k in ("policy_logits", "ref_logits"))
    losses, _, _ = pair_losses(policy[:2], policy[2:], reference[:2], reference[2:], PreferenceSpec())
    assert abs(float(losses.mean()) - case["loss"]) > 1e-3
