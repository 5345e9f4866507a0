"""The quantization backends: a closed name -> class table, as transformers' `AUTO_QUANTIZER_MAPPING`.

`quant.backend` (checked at compose time against `pipeline.core.schema.QuantBackend`) and a checkpoint's
saved `quant_method` are only ever keys into these tables; nothing a config says is imported or resolved.
Importing a backend module imports no quantization library (each imports its own inside its methods).
"""

from __future__ import annotations

from typing import Any

from pipeline.core.schema import QuantBackend, QuantConfig
from stages.backends.base import Backend, BackendUnavailable
from stages.backends.bnb import BnbBackend
from stages.backends.hqq import HqqBackend
from stages.backends.quanto import QuantoBackend
from stages.backends.torchao import TorchaoBackend

BACKENDS: dict[str, type[Backend]] = {
    "bnb": BnbBackend,
    "torchao": TorchaoBackend,
    "quanto": QuantoBackend,
    "hqq": HqqBackend,
}

__all__ = ["BACKENDS", "Backend", "BackendUnavailable", "for_quant", "for_saved", "saved_method"]


class UnknownBackend(ValueError):
    """A backend name outside the table."""


def for_quant(quant: QuantConfig) -> Backend | None:
    """The backend a quant setting asks for; None for quant=none."""
    key = quant.backend.value if isinstance(quant.backend, QuantBackend) else str(quant.backend)
    if key == "none":
        return None
    cls = BACKENDS.get(key)
    if cls is None:
        raise UnknownBackend(f"quant.backend={key!r}: not a backend; valid: none, {', '.join(BACKENDS)}")
    return cls(quant)


def saved_method(saved: Any) -> str | None:
    """A saved quantization_config's method, as the backend that wrote it spells it."""
    saved = saved if isinstance(saved, dict) else saved.to_dict()
    method = saved.get("quant_method")
    method = getattr(method, "value", method)
    for cls in BACKENDS.values():
        method = cls.saved_method(saved) or method
    return method


def for_saved(method: str | None) -> Backend | None:
    """The backend that reads checkpoints saved with `method`, if one of ours does."""
    for cls in BACKENDS.values():
        if method is not None and any(str(method).startswith(m) for m in cls.saved_methods):
            return cls(None)
    return None
