"""The bounded streamer's memory model: its load simulated on sizes alone, what each device holds, tensor by tensor.

The streamer (stages/stream/bounded.py) reads tensors in file order, each shard's keys sorted, as views of the
memory-mapped shard (stages/stream/reader.py); it converts the current tensor (cast, quantize on the fly,
place), which brings its pages into the process, and drops them before taking the next. So while tensor i is
converted the process holds: the RSS it started with, everything placed before i that is not a view of the
file, tensor i's pages, and what converting it allocates (its stored form, its quantization state, a cast copy,
the kernel's working set, or on the first CPU-quantized tensor the kernel's first-call cost). A tensor kept
as it is (on the CPU in its own dtype) stays an untouched view: it is in the footprint, not in the RSS.
Pickle shards are copied out instead: there a tensor as read is a copy, fused groups wait as copies, and with
`prefetch` the `prefetch + 1` tensors read ahead on a thread wait in memory too.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

from pipeline.checkpoints import checkpoint, synthetic
from pipeline.core import progress
from pipeline.core.context import LoadContext
from pipeline.core.dtypes import SAFETENSORS
from pipeline.core.placement import device_of
from pipeline.core.sizes import parse_size
from stages.stream.probe import KernelCost


@dataclass
class Read:
    """One checkpoint tensor as the streamer meets it (dtype None: not a float)."""

    key: str
    numel: int
    itemsize: int
    dtype: torch.dtype | None

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass
class Simulation:
    """What the simulation found: resident bytes per device, peaks per device, and where the host peak falls."""

    resident: Counter = field(default_factory=Counter)
    mapped: Counter = field(default_factory=Counter)  # of resident: views of the shards, not in the RSS
    quant_state: Counter = field(default_factory=Counter)
    # what each device really holds once loaded: every tensor's storage, quantized data and its state
    held: Counter = field(default_factory=Counter)
    peak: Counter = field(default_factory=Counter)
    peak_at: str = ""
    largest_transient: tuple[str, int] = ("", 0)


def read_order(ctx: LoadContext) -> list[Read]:
    """The tensors in the order the streamer reads them: the checkpoint's headers when it is here, else the
    layout a `save_pretrained` checkpoint of this architecture has (shards of `model.synthetic.shard_size`)."""
    if ctx.checkpoint is not None:
        reads = []
        for shard in ctx.checkpoint.files:
            if ctx.checkpoint.format == checkpoint.PICKLE:  # memory-mapped: sizes and dtypes, no data read
                tensors = checkpoint.load_pickle(shard)
                for key, t in sorted(tensors.items()):
                    dtype = t.dtype if t.dtype.is_floating_point else None
                    reads.append(Read(key, t.numel(), t.element_size(), dtype))
                del tensors
                continue
            with safe_open(shard, framework="pt", device="cpu") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    name = sl.get_dtype()
                    dtype = SAFETENSORS.get(name, torch.float16)
                    floating = dtype if dtype.is_floating_point else None
                    reads.append(Read(key, math.prod(sl.get_shape()), dtype.itemsize, floating))
        return reads
    dtype = ctx.model_config.dtype if isinstance(ctx.model_config.dtype, torch.dtype) else torch.float16
    itemsize = torch.empty((), dtype=dtype).element_size()
    max_bytes = parse_size(ctx.cfg.model.synthetic.shard_size, "model.synthetic.shard_size")
    shards = synthetic.split_shards(synthetic.tensor_plan(ctx.model_config), itemsize, max_bytes)
    return [Read(k, math.prod(s), itemsize, dtype) for shard in shards for k, s in sorted(shard)]


def simulate(
    ctx: LoadContext,
    reads: list[Read],
    base: int,
    prefetch: int,
    kernels: dict[str, KernelCost],
    device_map: dict[str, Any] | None = None,
) -> Simulation:
    """Simulate the bounded streamer over `reads`; `base` is the process RSS before the stream, `kernels` the
    measured cost of each fast CPU kernel ('4bit', 'int8') the load uses, `device_map` ctx's unless given."""
    model, quantizer, dtype, backend = ctx.model, ctx.quantizer, ctx.dtype, ctx.backend
    device_map = ctx.device_map if device_map is None else device_map
    expected = dict(model.named_parameters()) | dict(model.named_buffers())
    mapping = get_model_conversion_mapping(model, None, None)
    renamings = [w for w in mapping if isinstance(w, WeightRenaming)]
    converters = [w for w in mapping if isinstance(w, WeightConverter)]
    out = Simulation()
    out.peak["cpu"] = base
    # a tied weight (lm_head.weight -> model.embed_tokens.weight) shares its source's storage once postprocess ties
    # it: it holds nothing of its own, whether the checkpoint has a copy of it or not
    tied = {t for t, s in (getattr(model, "all_tied_weights_keys", None) or {}).items() if t != s and s in expected}
    # safetensors shards are mapped (tensors are views), pickle shards copied out (stages/stream/reader.py)
    mapped = ctx.checkpoint is None or ctx.checkpoint.format != checkpoint.PICKLE
    kernel_resident = 0
    used: set[str] = set()  # kernels already called
    seen: set[str] = set()
    compute_itemsize = torch.empty((), dtype=dtype).element_size()
    # tensors that a converter fuses (MoE experts) wait until their group is complete (stages/stream/convert.py)
    targets = [rename_source_key(r.key, renamings, converters, model.base_model_prefix, expected) for r in reads]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    left = Counter(t for t, pattern in targets if pattern is not None and t in expected)
    waiting: dict[str, list[int]] = {}  # target -> [bytes, numel] of a fused group's tensors read so far
    pending = 0
    for i, (r, (target, pattern)) in enumerate(zip(reads, targets, strict=True)):
        param = expected.get(target)
        if param is None:
            continue
        seen.add(target)
        ahead = 0 if mapped else sum(x.nbytes for x in reads[i + 1 : i + 2 + prefetch])
        fused = pattern is not None
        if fused:
            group = waiting.setdefault(target, [0, 0])
            group[0] += r.nbytes
            group[1] += r.numel
            left[target] -= 1
            if left[target]:  # held, nothing placed yet: a copy in memory (pickle), an unread view (safetensors)
                pending += 0 if mapped else r.nbytes
                host = base + rss(out) + kernel_resident + pending + ahead
                if host > out.peak["cpu"]:
                    out.peak["cpu"], out.peak_at = host, r.key
                continue
            # complete: the group as read is the tensor to convert; fusing it allocates the parameter beside it
            pending -= 0 if mapped else group[0] - r.nbytes
            r = Read(target, group[1], r.itemsize, r.dtype)
            del waiting[target]
        device = str(device_of(device_map, target.rpartition(".")[0]))
        on_host = device == "cpu"
        quantized = quantizer is not None and backend.quantizes(model, quantizer, target)
        compiling = 0
        read = r.nbytes  # the tensor's pages (a view's, read by its conversion) or its copy (pickle)
        if quantized:
            stored = backend.stored_bytes(model, quantizer, target, param, r.numel)
            state = backend.quant_state_bytes(param, r.numel)
            held = backend.held_bytes(model, quantizer, target, param, r.numel)
            kind = backend.kernel_kind(param)
            # cast to the compute dtype and moved to the device first: a copy unless both already match
            convert = stored + state + (r.numel * compute_itemsize if r.dtype != dtype or not on_host else 0)
            convert += backend.transient_bytes(param, r.numel)
            if on_host and kind in kernels:
                convert += kernels[kind].working_set(r.numel)
                # the kernel's first call costs more (loading it): that replaces the working set, once
                compiling = (
                    kernels[kind].first_call_bytes - kernels[kind].working_set(r.numel) if kind not in used else 0
                )
                used.add(kind)
        else:
            target_dtype = param.dtype if (param.is_floating_point() and r.dtype is not None) else r.dtype
            stored = r.numel * (param.element_size() if target_dtype is param.dtype else r.itemsize)
            state = 0
            held = stored
            # on the CPU in its own dtype, the tensor as read becomes the parameter: nothing new is allocated;
            # from a mapped shard it is a view nothing reads, so not even its pages come in
            convert = 0 if (on_host and target_dtype == r.dtype) else stored
            if convert == 0 and mapped and not fused:
                read = 0
                out.mapped[device] += stored
        # the fused copy, made on the CPU beside the tensors it is made of. From a mapped shard the group's pages
        # stay in until the group is released after its last op, so a chain of ops (Mixtral's gate_up: stack the
        # experts, then concatenate w1 and w3) holds each op's full-size output beside them; copies (pickle) are
        # freed by the first op as it consumes them (measured: within 5% with one fused copy)
        ops = max(len(by_pattern[pattern].operations), 1) if fused and mapped else 1
        fuse = r.nbytes * ops if fused else 0
        host = base + rss(out) + kernel_resident + read + ahead + pending + fuse
        if on_host:
            host += convert + compiling
        elif device != "disk":
            gpu = out.resident[device] + out.quant_state[device] + convert
            out.peak[device] = max(out.peak[device], gpu)
        if host > out.peak["cpu"]:
            out.peak["cpu"], out.peak_at = host, r.key
        if read + fuse + convert > out.largest_transient[1]:
            out.largest_transient = (r.key, read + fuse + convert)
        out.resident[device] += stored
        out.quant_state[device] += state
        out.held[device] += 0 if target in tied else held
        if on_host and quantized and kind in kernels and not kernel_resident:
            kernel_resident = kernels[kind].resident_bytes
    # what no checkpoint holds (non-persistent buffers such as rotary tables) is made when the load finishes
    for name, tensor in expected.items():
        if name not in seen:
            device = str(device_of(device_map, name.rpartition(".")[0]))
            out.resident[device] += tensor.numel() * tensor.element_size()
            # made at the size the backend makes it (quanto's activation scales: float32 in an fp16 model)
            made = backend.footprint_bytes(model, quantizer, name, tensor) if quantizer is not None else None
            size = tensor.numel() * tensor.element_size() if made is None else made
            out.held[device] += 0 if name in tied else size
    for device in set(out.resident) - {"disk"}:
        in_memory = out.resident[device] - out.mapped[device] + out.quant_state[device]
        out.peak[device] = max(out.peak[device], in_memory)
    end = base + rss(out) + kernel_resident
    out.peak["cpu"] = max(out.peak["cpu"], end)
    return out


def rss(sim: Simulation) -> int:
    """What the placed weights hold in the process's RSS on the CPU: all but the untouched views."""
    return sim.resident["cpu"] - sim.mapped["cpu"] + sim.quant_state["cpu"]


def probe_kernels(ctx: LoadContext, device_map: dict[str, Any], kernel: str) -> dict[str, KernelCost]:
    """The backend's measure of the fast CPU kernels the load will run, if it runs one."""
    if ctx.backend is None or ctx.quantizer is None:
        return {}
    with progress.step("Plan: measuring the CPU kernel's memory on a probe tensor"):
        return ctx.backend.probe_kernels(ctx, device_map, kernel)


@dataclass
class StreamPlan:
    """A stream stage's answer to "what would you take?": the load as mapped, the same weights all on one GPU,
    the kernels' measured costs, and how many tensors it reads."""

    load: Simulation
    one_gpu: Simulation
    kernels: dict[str, KernelCost]
    tensors: int


def plan(ctx: LoadContext, base: int, device_map: dict[str, Any], prefetch: int, kernel: str) -> StreamPlan:
    """The bounded streamer's memory with these settings, from RSS `base` where the stage would start."""
    kernels = probe_kernels(ctx, device_map, kernel)
    reads = read_order(ctx)
    return StreamPlan(
        load=simulate(ctx, reads, base, prefetch, kernels, device_map=device_map),
        one_gpu=simulate(ctx, reads, base, prefetch, {}, device_map={"": 0}),
        kernels=kernels,
        tensors=len(reads),
    )
