"""ZeRO-3 partitioned loading (``llava_platform.train.partitioned``) on two real ranks: each rank reads
only its own slices, and the weights gathered back are the checkpoint's, for LLaVA and LLaVA-NeXT, with
a stage-1 projector on top."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from jobs import compose
from jobs.perf.ranks import spawn_ranks
from llava_platform.config import load_recipe
from llava_platform.model.compose import load_pretrained_llava
from llava_platform.train.deepspeed_config import build_deepspeed_config
from tests.helpers.recipes import NEXT_MODEL

RECIPE = "tiny_cpu_demo"


def gathered_weights(rank: int, world_size: int, model_path: str, projector: str | None) -> dict | None:
    """Rank function: load partitioned, check the partitions are slices, gather everything back on rank 0."""
    import deepspeed

    from llava_platform.train.partitioned import fill_partitions, load_partitioned

    config = build_deepspeed_config(global_batch_size=2, micro_batch_size=1, world_size=world_size, zero_stage=3,
                                    precision="fp32", offload_optimizer=False, max_grad_norm=1.0, weight_decay=0.0,
                                    lr=1e-3, use_gpu=False, param_persistence_threshold=0)
    model, keep_alive = load_partitioned(model_path, config, dtype=torch.float32)
    if projector:
        fill_partitions(model, load_file(projector), strict=False)
    local = sum(p.ds_tensor.numel() for p in model.parameters())
    total = sum(p.ds_numel for p in model.parameters())
    assert all(p.numel() == 0 for p in model.parameters()), "a parameter is whole on this rank"
    assert local <= total / world_size + 64 * len(list(model.parameters())), (local, total)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        weights = {name: p.detach().clone() for name, p in model.named_parameters()} if rank == 0 else None
    del keep_alive
    return weights


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_each_rank_reads_its_slices_and_the_gathered_model_is_the_checkpoint(arch, tmp_path):
    recipe = load_recipe(RECIPE, list(NEXT_MODEL) if arch == "llava_next" else [])
    checkpoint = compose.run(recipe, tmp_path / "initial")
    expected = load_pretrained_llava(str(checkpoint))[0].state_dict()  # transformers' own loading
    projector = {name: torch.randn_like(t) for name, t in expected.items() if "multi_modal_projector" in name}
    save_file(projector, tmp_path / "projector.safetensors")  # as save_projector writes it: the model's names
    gathered, _ = spawn_ranks(gathered_weights, 2, str(checkpoint), str(tmp_path / "projector.safetensors"))
    assert set(gathered) == set(expected) and projector
    for name, weight in gathered.items():
        want = projector.get(name, expected[name])
        assert torch.equal(weight, want.to(weight.dtype)), name
