"""Samples -> model inputs: pad token sequences, stack uint8 tiles, normalise on the target device.

Used by the training workers (on rows of an Arrow batch) and by the demo. Tiles arrive as uint8
and become float only here, on the device that computes (design decision 3).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from llava_platform.data.conversation import IGNORE_INDEX
from llava_platform.data.tiling import normalize_tiles


def as_tensor(array) -> torch.Tensor:
    """A tensor over ``array``'s memory, or over a copy where that memory is read-only (Arrow's buffers are:
    PyTorch cannot guard them, and warns)."""
    array = np.asarray(array)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def pad_sequences(sequences: Sequence[Sequence[int]], pad_value: int) -> torch.Tensor:
    """Right-pad integer sequences into a (batch, longest) int64 tensor."""
    longest = max(len(s) for s in sequences)
    out = torch.full((len(sequences), longest), pad_value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        out[row, : len(sequence)] = torch.from_numpy(np.array(sequence, dtype=np.int64))
    return out


def pad_tile_stacks(stacks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack per-image LLaVA-NeXT tile stacks into one tensor, zero-padding each to the most tiles.

    The layout transformers' LLaVA-NeXT processor builds for a batch; both the training collate and
    the serving batcher (``inference.merge_inputs``) pad this way.

    Args:
        stacks: one tensor of shape (tiles_i, 3, T, T) per image, at least one; tile counts may differ.

    Returns:
        Tensor of shape (images, max_tiles, 3, T, T) with the first stack's dtype and device; the tiles
        past an image's own count are zeros.
    """
    most = max(stack.shape[0] for stack in stacks)
    out = stacks[0].new_zeros((len(stacks), most, *stacks[0].shape[1:]))
    for i, stack in enumerate(stacks):
        out[i, : stack.shape[0]] = stack
    return out


def collate(
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    tiles: Sequence[np.ndarray | None],
    image_sizes: Sequence[tuple[int, int] | None],
    *,
    pad_token_id: int,
    anyres: bool,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Build a model batch from per-sample token lists and uint8 tiles.

    Args:
        input_ids, labels: per-sample token ids and labels (same lengths per sample).
        tiles: per-sample uint8 tiles of shape (num_tiles, 3, T, T); ``None`` or zero tiles for text-only samples.
        image_sizes: per-sample original (height, width); ignored for text-only samples.
        pad_token_id: id used to right-pad ``input_ids``; labels pad with ``IGNORE_INDEX``.
        anyres: LLaVA-NeXT layout (``pixel_values`` (images, max_tiles, 3, T, T) + ``image_sizes``).
        image_mean, image_std: the tower's normalisation.
        device: where tensors are built and normalised (``None``: where they are, the CPU).

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` of shape (batch, longest); for batches with images
        ``pixel_values`` of shape (images, 3, T, T) (LLaVA) or (images, max_tiles, 3, T, T) (NeXT, zero
        padded like transformers' processor) and, for NeXT, ``image_sizes`` (images, 2).
    """
    ids = pad_sequences(input_ids, pad_token_id)
    attention = pad_sequences([[1] * len(s) for s in input_ids], 0)
    batch = {
        "input_ids": ids.to(device),
        "attention_mask": attention.to(device),
        "labels": pad_sequences(labels, IGNORE_INDEX).to(device),
    }
    with_image = [i for i, t in enumerate(tiles) if t is not None and len(t) > 0]  # text rows: None or 0 tiles
    image_tiles = [as_tensor(tiles[i]) for i in with_image]
    if not image_tiles:
        return batch
    if anyres:
        stacked = pad_tile_stacks(image_tiles)
        batch["image_sizes"] = torch.tensor([tuple(image_sizes[i]) for i in with_image], device=device)
    else:
        stacked = torch.cat(image_tiles)
    pixels = normalize_tiles(stacked.to(device), image_mean, image_std)
    if anyres:  # padded tiles are zeros after normalisation too, as in transformers' processor
        for i, t in enumerate(image_tiles):
            pixels[i, t.shape[0] :] = 0
    batch["pixel_values"] = pixels
    return batch


def collate_onevision(
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    tiles: Sequence[np.ndarray],
    image_sizes: Sequence[Sequence[Sequence[int]]],
    frames: Sequence[np.ndarray],
    *,
    pad_token_id: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """A LLaVA-OneVision batch, whose samples have no image, one (anyres), several, or a video.

    Args:
        tiles: per-sample uint8 tiles, every image's in order: a lone image's anyres stack, or one tile
            per image of a several-image sample.
        image_sizes: per-sample original (height, width) of each image (empty without images).
        frames: per-sample uint8 video frames (num_frames, 3, T, T); zero frames without a video. The
            samples' videos have the same frame count (``data.video.frames``).
        others: as ``collate``.

    Returns:
        ``collate``'s token tensors; with images, ``pixel_values`` (images, max_tiles, 3, T, T) zero padded,
        ``image_sizes`` (images, 2) and ``batch_num_images`` (batch,), which tells the model which images
        to unpack as anyres (a sample's only image) and which as one tile; with videos,
        ``pixel_values_videos`` (videos, frames, 3, T, T).
    """
    batch = collate(input_ids, labels, [None] * len(input_ids), [None] * len(input_ids), pad_token_id=pad_token_id,
                    anyres=False, image_mean=image_mean, image_std=image_std, device=device)
    stacks, sizes, counts = [], [], []
    for sample_tiles, sample_sizes in zip(tiles, image_sizes, strict=True):
        count = len(sample_sizes)
        counts.append(count)
        sample_tiles = as_tensor(sample_tiles)
        if count == 1:
            stacks.append(sample_tiles)
        else:
            stacks.extend(sample_tiles[k : k + 1] for k in range(count))
        sizes.extend(tuple(int(x) for x in size) for size in sample_sizes)
    if stacks:
        pixels = normalize_tiles(pad_tile_stacks(stacks).to(device), image_mean, image_std)
        for i, stack in enumerate(stacks):
            pixels[i, stack.shape[0] :] = 0
        batch.update(pixel_values=pixels, image_sizes=torch.tensor(sizes, device=device),
                     batch_num_images=torch.tensor(counts, device=device))
    videos = [as_tensor(f) for f in frames if f is not None and len(f) > 0]
    if videos:
        if len({v.shape for v in videos}) > 1:
            raise ValueError(f"videos of different frame counts cannot share a batch: {[v.shape[0] for v in videos]}")
        batch["pixel_values_videos"] = normalize_tiles(torch.stack(videos).to(device), image_mean, image_std)
    return batch


def pack_tokens(input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pack_sizes: Sequence[int], *,
                pad_token_id: int, varlen: bool = False,
                device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Samples packed into rows: row ``k`` holds the next ``pack_sizes[k]`` samples, one after another.

    Each sample keeps its own positions (``position_ids`` restart at 0) and its first label is ignored
    (the previous sample's last token must not learn to predict it; in its own row nothing predicts it).
    There is no ``attention_mask``: transformers then reads the samples' boundaries from the restarting
    positions and masks attention block-diagonally (sdpa/eager; an all-ones mask would turn that off and
    let samples attend to each other). Shorter rows are padded at the end with a block of their own
    (``pad_token_id``, ignored labels). The visual tensors are the samples' own, in token order
    (``collate``, ``collate_onevision``).

    Args:
        varlen: also give flash-attention's variable-length arguments (``cu_seq_lens_q/k``,
            ``max_length_q/k``) over the flattened batch, the padding blocks included.

    Returns:
        ``input_ids``, ``labels``, ``position_ids`` of shape (len(pack_sizes), longest row) [+ varlen keys].
    """
    if sum(pack_sizes) != len(input_ids):
        raise ValueError(f"packs of {list(pack_sizes)} samples, {len(input_ids)} samples given")
    rows_ids, rows_labels, lengths = [], [], []
    first = 0
    for size in pack_sizes:
        samples = range(first, first + size)
        first += size
        rows_ids.append(np.concatenate([np.asarray(input_ids[i], dtype=np.int64) for i in samples]))
        own = [np.asarray(labels[i], dtype=np.int64).copy() for i in samples]
        for sample in own:
            sample[:1] = IGNORE_INDEX
        rows_labels.append(np.concatenate(own))
        lengths.append([len(input_ids[i]) for i in samples])
    longest = max(len(row) for row in rows_ids)
    for row, sample_lengths in zip(rows_ids, lengths, strict=True):
        if len(row) < longest:
            sample_lengths.append(longest - len(row))  # the padding block
    batch = {
        "input_ids": pad_sequences(rows_ids, pad_token_id).to(device),
        "labels": pad_sequences(rows_labels, IGNORE_INDEX).to(device),
        "position_ids": torch.stack([torch.from_numpy(np.concatenate(
            [np.arange(n) for n in sample_lengths])) for sample_lengths in lengths]).to(device),
    }
    if varlen:
        flat = [n for sample_lengths in lengths for n in sample_lengths]
        bounds = torch.tensor(np.concatenate([[0], np.cumsum(flat)]), dtype=torch.int32, device=device)
        batch.update(cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=max(flat), max_length_k=max(flat))
    return batch
