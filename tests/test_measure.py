"""The measuring context manager sees peaks that `ru_maxrss` cannot, and agrees with the kernel."""

from __future__ import annotations

from tests.helpers import run_python


def test_sampler_sees_a_transient_peak_below_an_earlier_high_water_mark():
    # ru_maxrss is already 600 MB when the block starts, so only the sampler can see the block's 300 MB peak
    out = run_python(
        """
        import time, torch
        from pipeline.core.measure import track
        big = torch.ones(600 * 2**20, dtype=torch.uint8); del big
        with track() as m:
            t = torch.ones(300 * 2**20, dtype=torch.uint8); time.sleep(0.05); del t
        print(m.rss_peak_mb - m.rss_start_mb, m.rss_end_mb - m.rss_start_mb, m.wall_s, m.cpu_s)
        """
    )
    rise, end_rise, wall, cpu = map(float, out.split())
    assert 280 <= rise <= 340
    assert end_rise < 50
    assert wall >= 0.05 and cpu > 0


def test_cpu_time_counts_every_thread():
    # CPU time spent in worker threads, as each thread itself counts it, must show up in the block's cpu_s
    out = run_python(
        """
        import hashlib, threading, time
        from pipeline.core.measure import track
        data, spent = bytes(64 * 2**20), []
        def work():
            t0 = time.thread_time()
            for _ in range(4):
                hashlib.sha256(data).digest()
            spent.append(time.thread_time() - t0)
        with track() as m:
            threads = [threading.Thread(target=work) for _ in range(2)]
            [t.start() for t in threads]; [t.join() for t in threads]
        print(m.cpu_s, sum(spent))
        """
    )
    cpu, threads = map(float, out.split())
    assert threads > 0.1
    assert cpu >= 0.95 * threads


def test_a_gpu_not_used_yet_has_no_peak_to_reset(monkeypatch):
    """On a GPU machine, before CUDA's first use, torch refuses to reset a peak ('Invalid device argument': every
    load on an H200 failed so). A stand-in for torch.cuda that refuses as torch does: a block before CUDA's first
    use resets nothing and reads 0; once initialized, each GPU's peak is reset and read."""
    import torch

    from pipeline.core.measure import track

    class Cuda:
        initialized, resets = False, []

        def is_available(self):
            return True

        def is_initialized(self):
            return self.initialized

        def device_count(self):
            return 2

        def reset_peak_memory_stats(self, i):
            if not self.initialized:
                raise RuntimeError("Invalid device argument")
            self.resets.append(i)

        def max_memory_allocated(self, i):
            return 2**20 * self.initialized

        max_memory_reserved = max_memory_allocated

    cuda = Cuda()
    monkeypatch.setattr(torch, "cuda", cuda)
    with track() as m:
        pass
    assert cuda.resets == [] and m.cuda_max_allocated_mb == {"0": 0.0, "1": 0.0}
    cuda.initialized = True
    with track() as m:
        pass
    assert cuda.resets == [0, 1] and m.cuda_max_reserved_mb == {"0": 1.0, "1": 1.0}


def test_two_blocks_measured_apart_combine_into_one():
    from pipeline.core.measure import Metrics, combined

    first = Metrics(wall_s=1.0, cpu_s=0.9, rss_start_mb=20.0, rss_peak_mb=250.0, rss_end_mb=240.0)
    then = Metrics(
        wall_s=2.0, cpu_s=2.1, rss_start_mb=241.0, rss_peak_mb=400.0, rss_end_mb=390.0, cuda_max_allocated_mb={"0": 5.0}
    )
    both = combined(first, then)
    assert (both.wall_s, both.cpu_s) == (3.0, 3.0)
    assert (both.rss_start_mb, both.rss_peak_mb, both.rss_end_mb) == (20.0, 400.0, 390.0)
    assert both.cuda_max_allocated_mb == {"0": 5.0} and both.cuda_max_reserved_mb == {}
