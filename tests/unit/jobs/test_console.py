"""The jobs' console: the lines a person cannot act on are recognised (negative control of the end-to-end
job's console test, ``integration/jobs/test_pipeline_job.py``)."""

from jobs.console import NATIVE_LOG_LINE
from tests.helpers.console import noise

PLANTED = """[pipeline] 1. synthetic dataset -> outputs/x
/site-packages/mlflow/pyfunc/utils/data_validation.py:187: UserWarning: Add type hints to the `predict` method
[2026-12-06 04:20:46,940 E 10512 10512] core_worker.cc:2465: Actor with class name: 'MapWorker' has constructor
(TrainController pid=11447) [2026-12-06 04:21:07,044 E 11447 11474] core_worker.cc:2465: Actor ...
The Ray cluster currently does not have any available CPUs. The Dataset job will hang unless more CPUs are freed up.
(RayTrainWorker pid=1) FutureWarning: `torch.distributed.all_gather_into_tensor` is deprecated.
Loading weights: 100%|██████████| 82/82 [00:00<00:00, 31403.66it/s]
[train rank 0] step 1/1 (100%) loss 6.2830, 226 samples/s, 0 s left
accuracy stage2   short 94% of 50 | mc 100% of 50   (chance 25%)
"""


def test_noise_is_recognised_and_our_lines_are_not():
    found = noise(PLANTED)
    assert len(found) == 6, found
    assert not any("[train rank 0]" in line or "accuracy stage2" in line or "[pipeline]" in line for line in found)


def test_the_stderr_filter_takes_ray_s_native_log_lines():
    assert NATIVE_LOG_LINE.match(b"[2026-12-06 04:20:46,940 E 10512 10512] core_worker.cc:2465: Actor")
    assert NATIVE_LOG_LINE.match(b"[2026-12-06 04:20:46,940 W 1 2] gcs_client.cc:1: retrying")
    assert not NATIVE_LOG_LINE.match(b"[pipeline] 1. synthetic dataset")
    assert not NATIVE_LOG_LINE.match(b"Traceback (most recent call last):")
