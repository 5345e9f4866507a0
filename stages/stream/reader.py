"""Tensors out of checkpoint shards, one at a time, read ahead on a thread while the caller works.

Safetensors reads use the `pread` backend rather than a memory map: a mapped shard keeps every page it
touched resident in the process until it is closed, which for a 10 GB shard is 10 GB of RSS.

Pickle shards (`pytorch_model*.bin`, read only with model.allow_pickle=true) have no such backend: they are
loaded with `torch.load(mmap=True, weights_only=True)`, so nothing but tensors is unpickled and the data is
mapped, not copied, and each tensor is copied out of the mapping as it is handed on. The pages a shard's
tensors touched stay mapped until the shard is done (its dict is dropped before the next shard is opened):
unlike safetensors, a pickle shard may stay resident up to its size. Those pages are clean file pages, which
the kernel can reclaim under pressure, but they count in RSS.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from pipeline.checkpoints.checkpoint import load_pickle

_DONE = object()


def _tensors(files: list[Path]) -> Iterator[tuple[Path, str, torch.Tensor]]:
    for shard in files:
        if shard.suffix == ".bin":
            yield from _pickle_tensors(shard)
            continue
        with safe_open(shard, framework="pt", device="cpu", backend="pread") as f:
            for key in f.keys():
                yield shard, key, f.get_tensor(key)


def _pickle_tensors(shard: Path) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """A pickle shard's tensors in sorted key order (as safetensors lists them), each an owned copy: a view
    would keep the whole file's mapping alive in the model, and two keys sharing storage (tied weights)
    would alias."""
    tensors = load_pickle(shard)
    try:
        for key in sorted(tensors):
            yield shard, key, tensors[key].clone(memory_format=torch.contiguous_format)
    finally:
        del tensors  # the last view of the mapping: unmapped here, before the next shard is opened


def read_tensors(files: list[Path], prefetch: int) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """(shard, key, tensor) in file order; at most `prefetch` tensors wait in memory ahead of the caller."""
    if prefetch <= 0:
        yield from _tensors(files)
        return
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in _tensors(files):
                if not put(item):
                    return
            put(_DONE)
        except BaseException as err:  # handed to the consumer, raised there
            put(err)

    thread = threading.Thread(target=work, daemon=True, name="shard-reader")
    thread.start()
    try:
        while (item := q.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
            del item
    finally:
        stop.set()
        thread.join()
