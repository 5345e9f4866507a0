"""One context manager that measures a block of work: wall and CPU time, peak and final RSS, GPU peaks.

Peak RSS comes from a sampling thread (psutil, every few milliseconds) rather than `ru_maxrss`, which
never goes down inside a process and so cannot tell one stage's peak from an earlier one's. The sampler
also reads `ru_maxrss`, which the kernel keeps exactly: when it rises during the block, the kernel saw a
peak the sampler may have missed between two samples, and that figure wins.
"""

from __future__ import annotations

import resource
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

SAMPLE_S = 0.005


@dataclass
class Metrics:
    wall_s: float = 0.0
    cpu_s: float = 0.0
    rss_start_mb: float = 0.0
    rss_peak_mb: float = 0.0
    rss_end_mb: float = 0.0
    # of rss_end_mb, the private (anonymous) memory: not the file pages a view of a mapped shard reads, which the
    # page cache shares and can reclaim (None where the OS does not say)
    rss_anon_end_mb: float | None = None
    # per CUDA device index, reset at the start of the block; empty without a GPU
    cuda_max_allocated_mb: dict[str, float] = field(default_factory=dict)
    cuda_max_reserved_mb: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _mb(n: float) -> float:
    return round(n / 2**20, 1)


def rss_anon_mb(info: Any = None) -> float | None:
    """The process's private resident memory (MB): RSS less its file-backed and shared pages, from `info` (psutil's
    `memory_info()`, read now when not given); None where the OS does not say (not Linux)."""
    info = info or psutil.Process().memory_info()
    shared = getattr(info, "shared", None)
    return None if shared is None else _mb(info.rss - shared)


def ru_maxrss_bytes() -> int:
    """The process's peak RSS so far, as the kernel keeps it (KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Sampler(threading.Thread):
    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.proc, self.interval = psutil.Process(), interval
        self.peak = self.proc.memory_info().rss
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def stop(self) -> int:
        self.stop_event.set()
        self.join()
        return max(self.peak, self.proc.memory_info().rss)


@dataclass
class PeakRss:
    """RSS when a block began, and its peak once the block has ended (bytes)."""

    start: int
    peak: int = 0


@contextmanager
def peak_rss(interval: float = SAMPLE_S) -> Iterator[PeakRss]:
    """The peak RSS of the enclosed block: sampled every `interval` seconds, and raised to the kernel's
    `ru_maxrss` when the block set a new process-wide peak (one the samples may have missed)."""
    maxrss_before = ru_maxrss_bytes()
    sampler = _Sampler(interval)
    result = PeakRss(start=sampler.peak)
    sampler.start()
    try:
        yield result
    finally:
        result.peak = sampler.stop()
        maxrss_after = ru_maxrss_bytes()
        if maxrss_after > maxrss_before:
            result.peak = max(result.peak, maxrss_after)


def _cuda():
    """torch.cuda when torch is imported and sees a GPU, else None. Never imports torch itself: a run's setup
    imports it, measured (a process that has not imported torch yet has used no GPU memory to count)."""
    torch = sys.modules.get("torch")
    return torch.cuda if torch is not None and torch.cuda.is_available() else None


@contextmanager
def track() -> Iterator[Metrics]:
    """Measure the enclosed block; the yielded Metrics is filled in when the block ends (also on error)."""
    m = Metrics()
    cuda = _cuda()
    if cuda and cuda.is_initialized():  # before CUDA's first use there is no peak to reset (and torch refuses)
        for i in range(cuda.device_count()):
            cuda.reset_peak_memory_stats(i)
    try:
        with peak_rss() as rss:
            m.rss_start_mb = _mb(rss.start)
            wall0, cpu0 = time.perf_counter(), time.process_time()
            try:
                yield m
            finally:
                m.wall_s = round(time.perf_counter() - wall0, 4)
                m.cpu_s = round(time.process_time() - cpu0, 4)
    finally:
        m.rss_peak_mb = _mb(rss.peak)
        end = psutil.Process().memory_info()
        m.rss_end_mb, m.rss_anon_end_mb = _mb(end.rss), rss_anon_mb(end)
        cuda = cuda or _cuda()  # a block that imported torch: its peaks since then are the block's
        if cuda:
            for i in range(cuda.device_count()):
                m.cuda_max_allocated_mb[str(i)] = _mb(cuda.max_memory_allocated(i))
                m.cuda_max_reserved_mb[str(i)] = _mb(cuda.max_memory_reserved(i))


def combined(first: Metrics, then: Metrics) -> Metrics:
    """Two blocks of one process's work, measured apart (what lay between them left out), as one block: their wall
    and CPU time added, RSS from the first's start to the second's end, the higher peaks."""
    allocated, reserved = (
        {k: max(a.get(k, 0.0), b.get(k, 0.0)) for k in a.keys() | b.keys()}
        for a, b in (
            (first.cuda_max_allocated_mb, then.cuda_max_allocated_mb),
            (first.cuda_max_reserved_mb, then.cuda_max_reserved_mb),
        )
    )
    return Metrics(
        wall_s=round(first.wall_s + then.wall_s, 4),
        cpu_s=round(first.cpu_s + then.cpu_s, 4),
        rss_start_mb=first.rss_start_mb,
        rss_peak_mb=max(first.rss_peak_mb, then.rss_peak_mb),
        rss_end_mb=then.rss_end_mb,
        rss_anon_end_mb=then.rss_anon_end_mb,
        cuda_max_allocated_mb=allocated,
        cuda_max_reserved_mb=reserved,
    )
