"""Resource meter used by the precompute's stage log and the benchmarks; the device batch rule."""

import numpy as np

from lfp_core.config import inference_batch
from lfp_core.resources import Meter, peak_rss_bytes, reset_peak_rss


def test_meter_sees_an_allocation_and_resets_between_blocks():
    with Meter() as big:
        a = np.ones(200 * 2**20 // 8)  # 200 MiB, touched
        a += 1
    del a
    with Meter() as small:
        b = np.ones(10)
    assert big.wall >= 0 and big.cpu >= 0
    assert big.peak_rss is not None and big.peak_rss > 150 * 2**20
    if reset_peak_rss():  # Linux: the second block's peak does not include the first block's array
        assert small.peak_rss < big.peak_rss - 150 * 2**20
    assert "peak RSS" in big.describe() and b.sum() == 10
    assert peak_rss_bytes() > 0


def test_inference_batch_scales_on_cuda_only():
    assert inference_batch("cpu") == 32 and inference_batch("cpu", 64) == 64
    assert inference_batch("cuda") == 256 and inference_batch("cuda:1", 64) == 512
