"""The token-mean loss across ranks and accumulation: every supervised token of a global batch weighs the same.

Two real DeepSpeed ranks (gloo, no Ray, ZeRO-0 so that the averaged gradient sits in ``param.grad`` at the
accumulation boundary) run a global batch of 4 rows, 2 micro-steps each, with answers of very different
lengths, weighted by ``train.batches.normalise_loss`` (what the training loop uses). Their gradient must
equal a single process's gradient of the whole batch's summed token cross-entropy divided by its token count.
``loss: micro_batch_mean`` (LLaVA's original) must instead give the mean of the micro-batches' own means,
which differs here: the test can tell the two apart.
"""

from __future__ import annotations

import pytest
import torch

from jobs import compose
from jobs.perf.ranks import spawn_ranks
from llava_platform.config import load_recipe
from tests.helpers.rows import micro_batch

RECIPE = "tiny_cpu_demo"
STAGE = ["stage2.global_batch_size=4", "stage2.micro_batch_size=1", "stage2.deepspeed.zero_stage=0",
         "stage2.tunable=[projector,language_model]", "stage2.optim.lr=0.01"]
ROWS = [(True, 0, "red"), (False, 1, "The sum is two, because one plus one makes two, as everyone knows."),
        (True, 2, "a small red square near the top left corner of a grey picture"), (False, 3, "6")]
"""(image, seed, answer): supervised token counts from 2 to about 20."""


def batches(processor, recipe) -> list[dict[str, torch.Tensor]]:
    return [micro_batch(processor, recipe, image, seed, answer) for image, seed, answer in ROWS]


def rank_gradient(rank: int, world: int, overrides: list[str], model: str, token_mean: bool) -> dict:
    """Rank function: this rank's contiguous 2 of the 4 rows, weighted as the training loop weighs them; the
    averaged gradient at the accumulation boundary."""
    from llava_platform.config.build import deepspeed_spec
    from llava_platform.train.batches import normalise_loss
    from llava_platform.train.deepspeed_engine import build_deepspeed_engine, forward

    torch.set_num_threads(1)
    recipe = load_recipe(RECIPE, overrides)
    spec = deepspeed_spec(recipe, recipe.stage2, model, total_steps=1).at_world_size(world, 4)
    engine, processor = build_deepspeed_engine(spec)
    mine = batches(processor, recipe)[rank * 2:(rank + 1) * 2]
    weights = normalise_loss(mine, (1.0, 1.0), token_mean, torch.device("cpu"))
    for index, (batch, weight) in enumerate(zip(mine, weights, strict=True)):
        engine.backward(forward(engine, batch).loss * weight)
        if index == 0:
            engine.step()  # not a boundary: counts the micro-step, updates nothing
    return {name: p.grad.detach().clone() for name, p in engine.module.named_parameters() if p.grad is not None}


def reference_gradients(model: str, overrides: list[str]) -> tuple[dict, dict]:
    """One process, the whole batch: (token-mean gradient, mean-of-micro-batch-means gradient)."""
    from llava_platform.model.compose import load_pretrained_llava
    from llava_platform.model.trainability import set_trainable

    recipe = load_recipe(RECIPE, overrides)
    results = []
    for token_mean in (True, False):
        module, processor = load_pretrained_llava(model)
        set_trainable(module, recipe.stage2.tunable)
        items = batches(processor, recipe)
        sums, counts, means = [], [], []
        for batch in items:
            logits = module(**batch, use_cache=False).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            sums.append(loss)
            counts.append(int((labels != -100).sum()))
            means.append(loss / counts[-1])
        total = sum(sums) / sum(counts) if token_mean else sum(means) / len(means)
        total.backward()
        results.append({name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None})
    return results[0], results[1]


@pytest.mark.parametrize("token_mean", [True, False], ids=["token_mean", "micro_batch_mean"])
def test_two_ranks_by_two_micro_steps_give_the_single_process_gradient(token_mean, tmp_path):
    model = str(compose.run(load_recipe(RECIPE, STAGE), tmp_path / "initial"))
    by_tokens, by_micro_batches = reference_gradients(model, STAGE)
    expected, other = (by_tokens, by_micro_batches) if token_mean else (by_micro_batches, by_tokens)
    ranks = spawn_ranks(rank_gradient, 2, STAGE, model, token_mean)
    assert ranks[0].keys() == expected.keys() and len(expected) > 10
    for name, grad in expected.items():
        for rank in ranks:
            assert torch.allclose(rank[name], grad, rtol=1e-4, atol=1e-7), (name, (rank[name] - grad).abs().max())
    differs = max(float((expected[n] - other[n]).abs().max() / other[n].abs().max().clamp_min(1e-12)) for n in other)
    assert differs > 1e-2, f"the two normalisations give the same gradient here ({differs}): the test cannot tell"
