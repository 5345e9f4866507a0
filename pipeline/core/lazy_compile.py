"""`torch.compile` deferred to each function's first call, while a library that compiles at its import is imported.

bitsandbytes decorates a few functions with `torch.compile` at its import (`backends/default/ops.py`: the CPU
forward's and generic quantize's helpers, which our load never calls), and `torch.compile` imports torch._dynamo
and torch._inductor on the spot: ~0.85 s of the import's ~0.9 s on the 2-core machine. Inside
`compile_on_first_call`, a function given to `torch.compile` is compiled by the real `torch.compile`, with the same
options, at its first call instead; a module or any other callable is compiled at once, as before. It changes
nothing once the block ends, so it is safe in any process (stages/backends/bnb imports bitsandbytes inside it).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def compile_on_first_call() -> Iterator[None]:
    """Inside the block, `torch.compile(fn, **options)` of a function (also as a decorator, with or without
    options) returns a stand-in that compiles `fn` with the real `torch.compile(fn, **options)` at its first call
    and from then on calls what that returned (see the module docstring); `torch.compile` is restored after."""
    real = torch.compile

    def deferred(model: Any = None, **options: Any) -> Any:
        if model is None:  # @torch.compile(dynamic=False): the decorator
            return functools.partial(deferred, **options)
        if not inspect.isfunction(model):  # a module, a bound method, ...: as before
            return real(model, **options)
        compiled: Callable | None = None

        @functools.wraps(model)
        def first_call(*args: Any, **kwargs: Any) -> Any:
            nonlocal compiled
            if torch.compiler.is_compiling():  # traced by an outer compile, which inlines a compiled function
                return model(*args, **kwargs)
            if compiled is None:
                compiled = real(model, **options)
            return compiled(*args, **kwargs)

        return first_call

    torch.compile = deferred
    try:
        yield
    finally:
        torch.compile = real
