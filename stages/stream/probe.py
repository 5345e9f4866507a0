"""What the bounded streamer's CPU kernels cost in memory beyond their inputs and outputs, measured here.

A backend's fast kernels (stages/backends/) are compiled by torch.compile on their first call: that call
raises RSS by tens of MB while inductor runs, and leaves part of it resident (compiled code, imports). Later
calls hold a working set of their own (a float32 staging buffer and inductor's temporaries per chunk),
independent of the tensor's size past a few chunks. Neither follows from the tensor sizes, and on a small
model both outweigh the weights, so a plan measures them by quantizing a random probe tensor, no weight,
twice, with a fast RSS sampler.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil
import torch

from pipeline.core.measure import peak_rss

PROBE_SHAPE = (4096, 1024)  # four of the kernels' 2**20-element chunks: past it the working set stays flat


@dataclass
class KernelCost:
    """RSS a kernel adds beyond its input and outputs: on its first call, kept after it, on each later call."""

    first_call_bytes: int
    resident_bytes: int
    working_set_bytes: int
    probe_elements: int

    def working_set(self, numel: int) -> int:
        """The working set for a tensor of `numel` elements: flat past the probe's size, smaller below it."""
        return int(self.working_set_bytes * min(1.0, numel / self.probe_elements))

    def to_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.__dict__.items()}


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _peak_during(fn: Callable[[], Any]) -> tuple[int, int, Any]:
    """(RSS at start, peak RSS while fn ran, fn's result). Sampled every 0.2 ms (a kernel call lasts ms);
    compiling spikes for less than that, which the kernel's high-water mark catches when it sets a new one."""
    with peak_rss(interval=0.0002) as rss:
        result = fn()
    return rss.start, max(rss.peak, _rss()), result


def _nbytes(out: Any) -> int:
    return sum(t.numel() * t.element_size() for t in out if isinstance(t, torch.Tensor))


def probe(call: Callable[[torch.Tensor], Any], dtype: torch.dtype, cast_bytes_per_element: int = 0) -> KernelCost:
    """Measure a backend's fast CPU kernel `call` on a random probe tensor of `dtype`; `cast_bytes_per_element`:
    the copy the kernel's caller makes first (e.g. to fp16), not the kernel's own."""
    x = torch.randn(PROBE_SHAPE, dtype=torch.float32).to(dtype)
    cast = x.numel() * cast_bytes_per_element
    start, peak, out = _peak_during(lambda: call(x))
    outputs = _nbytes(out)
    first = peak - start - outputs - cast
    del out
    resident = _rss() - start
    start, peak, out = _peak_during(lambda: call(x))
    working = peak - start - _nbytes(out) - cast
    del out
    return KernelCost(max(first, 0), max(resident, 0), max(working, 0), x.numel())
