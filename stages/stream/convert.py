"""Checkpoint tensors that the model's conversion mapping combines into one parameter, done while streaming.

transformers 5 loads some architectures through `WeightConverter`s (`conversion_mapping.py`): Mixtral's and
Qwen2-MoE's per-expert weights `experts.<i>.w1/w3.weight` become one fused `experts.gate_up_proj`, the
`w2`s one `experts.down_proj`. Which checkpoint tensors make each fused parameter is known before any
weight is read (the shard headers list every name), so each group is held only until its last member has
been read, then converted with transformers' own ops in the order its loader uses (keys sorted with
`dot_natural_key`), and freed. Memory stays bounded by the largest group (one layer's experts of one kind),
not the model; `peak_pending_bytes` records it.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

import torch
from transformers.core_model_loading import (
    SkipParameters,
    WeightConverter,
    dot_natural_key,
    rename_source_key,
)

from pipeline.checkpoints.checkpoint import CheckpointError


class Conversions:
    """Groups the streamed tensors of each converted parameter until complete, then converts them."""

    def __init__(
        self,
        names: set[str],
        renamings: list,
        converters: list[WeightConverter],
        prefix: str,
        expected: dict[str, torch.Tensor],
    ) -> None:
        self.converters = {p: c for c in converters for p in c.source_patterns}
        self.members: dict[str, set[str]] = {}  # target parameter -> the checkpoint keys it is made of
        if converters:
            for name in names:
                target, pattern = rename_source_key(name, renamings, converters, prefix, expected)
                if pattern is not None and target in expected:
                    self.members.setdefault(target, set()).add(name)
        self.pending: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
        self.pending_bytes = self.peak_pending_bytes = 0
        self.converted: dict[str, int] = {}  # converter ('sources -> targets') -> parameters made

    def add(self, key: str, target: str, pattern: str, tensor: torch.Tensor, model: Any, info: Any, where: Any) -> dict:
        """Hold `tensor` (checkpoint `key` in folder `where`, for `target` through `pattern`); when `target`'s group
        is complete, return the converted parameters by full name, else {}."""
        group = self.pending.setdefault(target, {})
        group[key] = (pattern, tensor)
        self.pending_bytes += tensor.numel() * tensor.element_size()
        self.peak_pending_bytes = max(self.peak_pending_bytes, self.pending_bytes)
        if set(group) != self.members[target]:
            return {}
        del self.pending[target]
        self.pending_bytes -= sum(t.numel() * t.element_size() for _, t in group.values())
        converter = deepcopy(self.converters[pattern])
        for source in sorted(group, key=dot_natural_key):
            converter.add_tensor(target, source, group[source][0], group[source][1])
        del group
        try:
            out = converter.convert(target, model=model, config=model.config, hf_quantizer=None, loading_info=info)
        except SkipParameters:  # transformers logged the error (a traceback, then the error) and skipped them
            reason = "; ".join(info.conversion_errors.pop(target, "").strip().splitlines()[-2:])
            raise CheckpointError(
                f"{where}: fusing the {len(self.members[target])} checkpoint tensors of {target!r} failed: {reason}; "
                "does config.json belong to these weights?"
            ) from None
        label = f"{' + '.join(converter.source_patterns)} -> {' + '.join(converter.target_patterns)}"
        self.converted[label] = self.converted.get(label, 0) + len(out)
        return {name: value[0] if isinstance(value, list) else value for name, value in out.items()}

    def facts(self) -> dict[str, Any]:
        return {"converted": self.converted, "peak_pending_bytes": self.peak_pending_bytes}
