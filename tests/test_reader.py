"""stages/stream/reader.py: safetensors tensors as views of the mapped shard; a converted tensor's pages leave
the process, a kept one stays the file's, and a write to it never reaches the file."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from stages.stream.reader import read_tensors
from tests.helpers import file_digests

MB = 2**20


def mapped_rss(path) -> int:
    """Bytes of `path`'s mappings resident in this process (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        first = line.split()[0]
        if "-" in first and not first.endswith(":"):  # a mapping's header line
            inside = line.rstrip().endswith(str(path))
        elif inside and first == "Rss:":
            total += int(line.split()[1]) * 1024
    return total


def shard(tmp_path):
    tensors = {f"w{i}": torch.randn(MB // 2, generator=torch.Generator().manual_seed(i)).half() for i in range(4)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    return path, tensors


def test_tensors_are_views_equal_to_the_file_in_its_order(tmp_path):
    path, tensors = shard(tmp_path)
    got = [(k, t) for _, k, t in read_tensors([path])]
    assert [k for k, _ in got] == sorted(tensors)
    for key, t in got:
        assert torch.equal(t, tensors[key])
    assert mapped_rss(path) > 0  # the views are of the mapping


def test_a_converted_tensors_pages_leave_the_process_once_the_next_is_asked_for(tmp_path):
    path, _ = shard(tmp_path)
    kept = []
    for _, _, t in read_tensors([path]):
        assert torch.isfinite(t.float()).all()  # read, as a conversion reads it: its pages come in
        kept.append(t)  # still referenced, as a held tensor would be: the mapping stays
    assert mapped_rss(path) <= 8 * 4096  # at most the pages shared with the header
    sum(t.float().sum() for t in kept)  # read again: the pages come back (from the page cache), same values
    assert mapped_rss(path) >= 4 * MB - 8 * 4096


def test_a_write_to_a_kept_view_stays_in_the_process(tmp_path):
    path, tensors = shard(tmp_path)
    before = file_digests(tmp_path)
    views = {k: t for _, k, t in read_tensors([path])}
    views["w0"].add_(1)
    assert torch.equal(views["w0"], tensors["w0"] + 1)
    assert file_digests(tmp_path) == before
    again = {k: t for _, k, t in read_tensors([path])}
    assert torch.equal(again["w0"], tensors["w0"])


def test_quant_none_keeps_the_weights_as_views_of_the_shards(load, cache_dir):
    model, record, _ = load("quant=none")
    shards = [f for f in (cache_dir / "synthetic").rglob("*.safetensors")]
    maps = open("/proc/self/maps").read().splitlines()
    spans = [
        tuple(int(x, 16) for x in line.split()[0].split("-"))
        for line in maps
        if any(line.endswith(str(s)) for s in shards)
    ]
    weight = model.model.embed_tokens.weight
    assert any(lo <= weight.data_ptr() < hi for lo, hi in spans)


def test_the_stream_sets_the_allocators_mmap_threshold_where_glibc_runs():
    import platform

    from stages.stream.memory import return_freed_memory

    glibc = platform.libc_ver()[0] == "glibc"
    assert return_freed_memory() is glibc  # mallopt found in the process's own C library, set, and said so
