"""Tensors out of checkpoint shards, one at a time, in file order, as views of the shard where it can.

Safetensors shards are memory-mapped copy-on-write (`MAP_PRIVATE`), and each tensor is handed on as a view of
the file's pages: nothing is copied or allocated to read it. What happens to its pages depends on the caller:

* a tensor the model keeps as it is (on the CPU in its own dtype: `quant=none`, and the embeddings, norms and
  lm_head of a quantized load) stays a view. Its pages are the page cache's, shared and reclaimable, and come
  into the process only when first read, as transformers' loader keeps them. A later write to one (training)
  copies the page it writes; the file never changes.
* a tensor that is converted (quantized, cast, sent to a GPU or to disk) is read through the mapping by the
  conversion, which brings its pages into the process; when the caller asks for the next tensor (or calls
  `release`) they are dropped again (`MADV_DONTNEED`: the page cache keeps them), so the process holds at most
  the tensor being converted, as the `pread` reader this replaced did, without its copy into a fresh buffer
  (page faults on 13.5 GB of fresh allocations were seconds of a 7B load).
The next tensor's pages are advised in (`MADV_WILLNEED`) before the current one is handed on, so that on a
cold page cache the disk reads it while the current one is quantized.

Pickle shards (`pytorch_model*.bin`, read only with model.allow_pickle=true) are loaded with
`torch.load(mmap=True, weights_only=True)`, so nothing but tensors is unpickled and the data is mapped, and
each tensor is copied out of the mapping as it is handed on. The pages a shard's tensors touched stay mapped
until the shard is done (its dict is dropped before the next shard is opened): unlike safetensors, a pickle
shard may stay resident up to its size. Those pages are clean file pages, which the kernel can reclaim under
pressure, but they count in RSS.

`prefetch > 0` hands tensors over from a thread that runs up to `prefetch` tensors ahead: for pickle shards
those are copies held in memory; for safetensors only views (their pages are advised in, not read).
"""

from __future__ import annotations

import json
import math
import mmap
import queue
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from pipeline.checkpoints.checkpoint import load_pickle
from pipeline.core.dtypes import SAFETENSORS

_DONE = object()


class MappedShard:
    """One safetensors file mapped copy-on-write; its tensors as views of the mapping.

    The mapping is never closed here: it lives as long as a view of it does (each view holds the mmap object),
    and goes with the last one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if path.stat().st_size else None
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.entries = {k: (v["dtype"], v["shape"], *v["data_offsets"]) for k, v in header.items()}

    def keys(self) -> list[str]:
        return sorted(self.entries)  # safetensors' own order

    def span(self, key: str) -> tuple[int, int]:
        """The byte range of `key` in the file."""
        _, _, start, stop = self.entries[key]
        return self.base + start, self.base + stop

    def tensor(self, key: str) -> torch.Tensor:
        name, shape, start, stop = self.entries[key]
        dtype = SAFETENSORS.get(name)
        if dtype is None:  # a dtype torch has no table entry for here: safetensors reads it (a copy)
            with safe_open(self.path, framework="pt", device="cpu") as f:
                return f.get_tensor(key)
        if stop == start:
            return torch.empty(shape, dtype=dtype)
        count = (stop - start) // dtype.itemsize
        return torch.frombuffer(self.map, dtype=dtype, count=count, offset=self.base + start).view(shape)

    def _advise(self, advice: int, start: int, stop: int) -> None:
        if self.map is None or stop <= start:
            return
        first = start - start % mmap.PAGESIZE  # the pages it overlaps: a neighbour's page dropped is read again
        last = min(math.ceil(stop / mmap.PAGESIZE) * mmap.PAGESIZE, len(self.map))
        self.map.madvise(advice, first, last - first)

    def release(self, key: str) -> None:
        """Drop `key`'s pages from the process (the page cache keeps them; a view of them reads them again).
        Safe because nothing writes to a view while the load runs: a written page would lose the write."""
        self._advise(mmap.MADV_DONTNEED, *self.span(key))

    def will_need(self, key: str) -> None:
        self._advise(mmap.MADV_WILLNEED, *self.span(key))


class Reader:
    """(shard, key, tensor) in file order; a safetensors tensor's pages are released when the next is asked
    for, or earlier with `release`."""

    def __init__(self, files: list[Path], prefetch: int = 0) -> None:
        self.files, self.prefetch = files, prefetch
        self.shards: dict[Path, MappedShard] = {}

    def release(self, keys) -> None:
        """Drop the pages of `keys` (tensors held past their turn, such as fused experts, once used)."""
        for mapped in self.shards.values():
            for key in keys:
                if key in mapped.entries:
                    mapped.release(key)

    def _tensors(self) -> Iterator[tuple[Path, str, torch.Tensor, MappedShard | None]]:
        for shard in self.files:
            if shard.suffix == ".bin":
                for item in _pickle_tensors(shard):
                    yield *item, None
                continue
            mapped = MappedShard(shard)
            keys = mapped.keys()
            for i, key in enumerate(keys):
                if i + 1 < len(keys):
                    mapped.will_need(keys[i + 1])
                yield shard, key, mapped.tensor(key), mapped

    def __iter__(self) -> Iterator[tuple[Path, str, torch.Tensor]]:
        items = self._tensors() if self.prefetch <= 0 else _ahead(self._tensors(), self.prefetch)
        for shard, key, tensor, mapped in items:
            if mapped is not None:
                self.shards[shard] = mapped  # for `release`, until the reader goes (views keep it anyway)
            yield shard, key, tensor
            del tensor
            if mapped is not None:
                mapped.release(key)


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


def _ahead(items: Iterator, prefetch: int) -> Iterator:
    """`items`, produced on a thread at most `prefetch` ahead of the caller."""
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
            for item in items:
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


def read_tensors(files: list[Path], prefetch: int = 0) -> Reader:
    """(shard, key, tensor) in file order; see the module's docstring for what a tensor's pages do."""
    return Reader(files, prefetch)
