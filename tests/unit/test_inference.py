"""Model inputs shared by the engines: merging single requests into a batch, the ids that end an answer."""

import pytest
import torch

from llava_platform.inference import end_token_ids, merge_inputs


def test_merge_inputs_left_pads_and_pads_tile_stacks():
    first = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "pixel_values": torch.ones(1, 3, 3, 2, 2), "image_sizes": torch.tensor([[10, 20]])}
    second = {"input_ids": torch.tensor([[8]]), "attention_mask": torch.ones(1, 1, dtype=torch.long),
              "pixel_values": torch.ones(1, 5, 3, 2, 2), "image_sizes": torch.tensor([[30, 40]])}
    merged = merge_inputs([first, second], pad_token_id=0)
    assert merged["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert merged["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert merged["pixel_values"].shape == (2, 5, 3, 2, 2) and merged["pixel_values"][0, 3:].abs().sum() == 0
    assert merged["image_sizes"].tolist() == [[10, 20], [30, 40]]


def test_merge_inputs_pads_several_images_per_request_like_concatenating_padded_requests():
    torch.manual_seed(0)
    pixels = [torch.rand(2, 3, 3, 2, 2), torch.rand(1, 5, 3, 2, 2), torch.rand(3, 1, 3, 2, 2)]
    items = [{"input_ids": torch.tensor([[1]]), "attention_mask": torch.ones(1, 1, dtype=torch.long),
              "pixel_values": p} for p in pixels]
    expected = torch.cat([torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, 5 - p.shape[1])) for p in pixels])
    assert torch.equal(merge_inputs(items, pad_token_id=0)["pixel_values"], expected)


@pytest.mark.parametrize(("eos", "expected"), [(None, set()), (2, {2}), ([2, 7], {2, 7}), ((2, 7), {2, 7})])
def test_end_token_ids_accepts_one_id_a_list_or_none(eos, expected):
    from transformers import GenerationConfig

    assert end_token_ids(GenerationConfig(eos_token_id=eos)) == expected
