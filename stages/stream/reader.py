"""Tensors out of safetensors shards, one at a time, read ahead on a thread while the caller works.

Reads use safetensors' `pread` backend rather than a memory map: a mapped shard keeps every page it
touched resident in the process until it is closed, which for a 10 GB shard is 10 GB of RSS.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

_DONE = object()


def _tensors(files: list[Path]) -> Iterator[tuple[Path, str, torch.Tensor]]:
    for shard in files:
        with safe_open(shard, framework="pt", device="cpu", backend="pread") as f:
            for key in f.keys():
                yield shard, key, f.get_tensor(key)


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
