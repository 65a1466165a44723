"""The DPO loss (``train.preference``) against LLaVA-NeXT's own trainer code run on fixed inputs
(``tests/fixtures/official_dpo``): per-pair losses, rewards, the SFT term, the total and its gradients."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llava_platform.config.schema import PreferenceConfig
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
    losses, _, _ = pair_losses(policy[:2], policy[2:], reference[:2], reference[2:], PreferenceConfig().build())
    assert abs(float(losses.mean()) - case["loss"]) > 1e-3


def test_the_loss_and_its_gradients_match_the_hand_derived_formulas():
    """On fixed logits, by hand: one pair, vocabulary 3, beta 0.5, dpo_alpha 1, gamma 0.25.

    Sequence log-probabilities are sums of log-softmax at the labelled tokens after the shift; with
    z = (c - r) - (c_ref - r_ref) the DPO term is -log sigmoid(beta z), whose derivative in c is
    -beta (1 - sigmoid(beta z)) (and the opposite in r); the SFT term is the chosen tokens' mean cross-entropy,
    whose gradient in the logits is (softmax - one-hot) / tokens, times gamma."""
    beta, gamma = 0.5, 0.25
    spec = PreferenceSpec(beta=beta, dpo_alpha=1.0, gamma=gamma, label_smoothing=0.0, loss_type="sigmoid")
    logits = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 2.0]],     # chosen
                           [[0.2, 0.1, 0.0], [1.0, -1.0, 0.5], [0.3, 0.3, 0.3]]],   # rejected
                          requires_grad=True)
    labels = torch.tensor([[-100, 1, 2], [-100, 0, 1]])  # the prompt token carries no loss
    ref_chosen, ref_rejected = torch.tensor([-1.0]), torch.tensor([-2.5])
    total, metrics = preference_loss(logits, labels, ref_chosen, ref_rejected, spec)
    total.backward()

    log_softmax = [[math.log(math.exp(v) / sum(math.exp(u) for u in row)) for v in row] for row in
                   logits.detach().tolist()[0][:2] + logits.detach().tolist()[1][:2]]
    chosen = log_softmax[0][1] + log_softmax[1][2]  # position t predicts label t + 1
    rejected = log_softmax[2][0] + log_softmax[3][1]
    z = (chosen - rejected) - (-1.0 - -2.5)
    sigma = 1 / (1 + math.exp(-beta * z))
    sft = -(log_softmax[0][1] + log_softmax[1][2]) / 2
    assert total.item() == pytest.approx(-math.log(sigma) + gamma * sft, abs=1e-6)
    assert metrics["rewards/chosen"] == pytest.approx(beta * (chosen - -1.0), abs=1e-6)
    assert metrics["rewards/margins"] == pytest.approx(beta * z, abs=1e-6)
    dpo_slope = -beta * (1 - sigma)  # d loss / d (chosen log-prob); +|slope| for the rejected one
    grad = logits.grad
    for position, label in ((0, 1), (1, 2)):  # chosen row: DPO through the log-prob, plus the SFT term
        probs = torch.softmax(logits.detach()[0, position], -1)
        onehot = torch.nn.functional.one_hot(torch.tensor(label), 3).float()
        expected = dpo_slope * (onehot - probs) + gamma * (probs - onehot) / 2
        torch.testing.assert_close(grad[0, position], expected, atol=1e-6, rtol=0)
    for position, label in ((0, 0), (1, 1)):  # rejected row: DPO only, the opposite sign
        probs = torch.softmax(logits.detach()[1, position], -1)
        onehot = torch.nn.functional.one_hot(torch.tensor(label), 3).float()
        torch.testing.assert_close(grad[1, position], -dpo_slope * (onehot - probs), atol=1e-6, rtol=0)
    assert grad[:, 2].abs().sum() == 0  # the last position predicts nothing
