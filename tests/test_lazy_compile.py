"""pipeline/core/lazy_compile.py: `torch.compile` deferred to each function's first call while bitsandbytes is
imported."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.lazy_compile import compile_on_first_call
from tests.helpers import run_python


def fake_compile(calls: list):
    """A `torch.compile` that records what it was given and returns a function that says it was compiled."""

    def compile(model=None, **options):
        calls.append((model, options))
        if isinstance(model, torch.nn.Module):
            return model
        return lambda *args, **kwargs: ("compiled", model(*args, **kwargs))

    return compile


def double(x):
    """Twice x."""
    return 2 * x


def test_a_function_is_compiled_at_its_first_call_with_the_same_options(monkeypatch):
    calls: list = []
    monkeypatch.setattr(torch, "compile", fake_compile(calls))
    real = torch.compile
    with compile_on_first_call():
        assert torch.compile is not real
        plain = torch.compile(double)
        with_options = torch.compile(double, dynamic=False, mode="max-autotune")

        @torch.compile
        def as_decorator(x):
            return x + 1

        @torch.compile(dynamic=False)
        def as_decorator_with_options(x):
            return x - 1

    assert torch.compile is real and calls == []  # restored; nothing compiled yet
    assert plain.__name__ == "double" and plain.__doc__ == "Twice x." and plain.__wrapped__ is double
    assert plain(3) == ("compiled", 6) and plain(4) == ("compiled", 8)
    assert with_options(5) == ("compiled", 10)
    assert as_decorator(1) == ("compiled", 2) and as_decorator_with_options(1) == ("compiled", 0)
    assert calls == [  # each once, at its first call, as the real torch.compile would have been called
        (double, {}),
        (double, {"dynamic": False, "mode": "max-autotune"}),
        (as_decorator.__wrapped__, {}),
        (as_decorator_with_options.__wrapped__, {"dynamic": False}),
    ]


def test_a_module_is_compiled_at_once_and_torch_compile_is_restored_after_an_error(monkeypatch):
    calls: list = []
    monkeypatch.setattr(torch, "compile", fake_compile(calls))
    real = torch.compile
    module = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="an import failed"), compile_on_first_call():
        assert torch.compile(module, backend="eager") is module
        raise RuntimeError("an import failed")
    assert calls == [(module, {"backend": "eager"})] and torch.compile is real


def test_bitsandbytes_imports_without_inductor_and_its_ops_still_compile():
    """What the load does (stages/backends/bnb): bitsandbytes imported in the stand-in's block. torch's inductor
    is not imported then; bitsandbytes' compiled op is compiled by inductor at its first call, with the result
    of the uncompiled op."""
    out = run_python(
        """
        import sys
        import torch
        from pipeline.core.lazy_compile import compile_on_first_call

        with compile_on_first_call():
            import bitsandbytes
        print("inductor at import:", "torch._inductor.compile_fx" in sys.modules)
        from bitsandbytes.backends.default import ops
        from torch._dynamo.utils import counters

        code = bitsandbytes.functional.create_dynamic_map().float()
        A, absmax = torch.randint(0, 256, (4096,), dtype=torch.uint8), torch.rand(64)
        out = ops._dequantize_blockwise_compute(A, absmax, code, 64, torch.float32)
        expected = (code[A.long()].view(-1, 64) * absmax.view(-1, 1)).view(-1)
        print("same result:", torch.equal(out, expected))
        inductor = counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"]
        print("graphs compiled:", counters["stats"]["unique_graphs"], "by inductor:", inductor)
        """
    )
    assert "inductor at import: False" in out
    assert "same result: True" in out
    assert "graphs compiled: 1 by inductor: 1" in out


def test_a_stand_in_first_called_inside_an_outer_compile_is_traced_into_it():
    """As an outer torch.compile traces into a function compiled with the real torch.compile: one graph, no
    break, the same result; the stand-in compiles at its first call outside."""
    out = run_python(
        """
        import torch
        from pipeline.core.lazy_compile import compile_on_first_call

        def inner(x):
            return torch.sin(x) * 2

        with compile_on_first_call():
            lazy = torch.compile(inner, backend="eager")
        real = torch.compile(inner, backend="eager")
        outer_lazy = torch.compile(lambda x: lazy(x) + 1, backend="eager", fullgraph=True)
        outer_real = torch.compile(lambda x: real(x) + 1, backend="eager", fullgraph=True)
        x = torch.randn(8)
        print("same:", torch.equal(outer_lazy(x), outer_real(x)), torch.equal(lazy(x), inner(x)))
        """
    )
    assert "same: True True" in out
