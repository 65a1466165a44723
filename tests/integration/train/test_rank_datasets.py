"""What each Ray Train worker reads when stage data streams: its own share of the records, preprocessed
by its own Ray Data pipeline, every record exactly once across ranks."""

from __future__ import annotations

import numpy as np
import ray

from jobs.train import streamed_rank_datasets
from llava_platform.config import load_recipe
from llava_platform.data.collate import collate
from llava_platform.data.image_settings import ImageSettings
from llava_platform.data.synthetic import write_synthetic_dataset
from llava_platform.model.compose import load_processor
from pipelines.preprocess import finish
from pipelines.quarantine import QuarantineLog
from tests.helpers.corpus import good_ids
from tests.helpers.recipes import RECIPE


def test_each_rank_streams_its_own_share_and_collates_to_model_inputs(ray_cluster, saved_checkpoints, tmp_path):
    files = write_synthetic_dataset(tmp_path, train=24, eval=1, seed=0)
    recipe = load_recipe(RECIPE, [f"stage2.data.train_files=[{files['stage2']}]", f"stage2.data.image_root={tmp_path}",
                                  "stage2.data.preprocessed=null", "scaling.num_workers=2"])
    quarantine = QuarantineLog.remote()
    checkpoint = str(saved_checkpoints["llava"])
    parts, counts = streamed_rank_datasets(recipe, recipe.stage2, checkpoint, quarantine)
    assert len(parts) == 2 and counts == [12, 12]

    processor = load_processor(checkpoint)
    settings = ImageSettings.from_processor(processor)
    per_rank = []
    for part in parts:
        batches = list(part.iter_batches(batch_size=4, batch_format="numpy"))
        per_rank.append([str(i) for batch in batches for i in batch["id"]])
        rows = batches[0]
        inputs = collate(rows["input_ids"], rows["labels"], list(rows["tiles"]), [tuple(s) for s in rows["image_size"]],
                         pad_token_id=processor.tokenizer.pad_token_id, anyres=False, image_mean=settings.image_mean,
                         image_std=settings.image_std)
        assert rows["tiles"][0].dtype == np.uint8
        assert inputs["pixel_values"].shape[1:] == (3, 56, 56) and inputs["pixel_values"].dtype.is_floating_point
    assert all(per_rank), "both ranks must receive rows"
    delivered = per_rank[0] + per_rank[1]
    assert len(delivered) == len(set(delivered)) and set(delivered) == good_ids(files["stage2"])
    assert finish(quarantine).kept == 24
    ray.kill(quarantine)
