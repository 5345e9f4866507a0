"""Third-party warnings that tell our user nothing they can act on, filtered at their logger (README, "What a run
prints" lists each one and what it means).

`quiet()` runs at the start of the load process (and of `pipeline.load`), before torch, transformers and
bitsandbytes are imported: a filter on a logger that does not exist yet is kept for when it does.
"""

from __future__ import annotations

import logging

# (logger, a piece of the message): dropped every time
DROPPED: tuple[tuple[str, str], ...] = (
    # bitsandbytes looks for an optional faster CPU 4-bit matmul (the `kernels` package); without it, it uses
    # its own CPU path. Nothing our load does depends on it.
    ("bitsandbytes.backends.cpu.ops", "from kernels-community"),
    # torchao (imported by transformers when installed) probes CUDA-only extensions and Triton on a CPU machine
    ("torchao", "Failed to load"),
    ("torchao.kernel.intmm", "Detected no triton"),
    # torch deprecates how torchao registers two enums with torch.compile; a note to torchao's authors
    ("torch.utils._pytree", "is an Enum subclass"),
    # transformers' warning that it would skip an unknown quantization_config; config_merge refuses such a
    # checkpoint instead, with its own error, which must come first and alone
    ("transformers.quantizers.auto", "Unknown quantization type"),
)

# (logger, a piece of the message): said once per run, then dropped
ONCE: tuple[tuple[str, str], ...] = (
    # int8 with a bf16/fp32 model: bitsandbytes casts each matmul's input to fp16, and says so on every matmul
    ("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast"),
)


class _Filter(logging.Filter):
    def __init__(self, pieces: list[str], once: bool) -> None:
        super().__init__()
        self.pieces, self.once, self.seen = pieces, once, set()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        for piece in self.pieces:
            if piece in message:
                if self.once and piece not in self.seen:
                    self.seen.add(piece)
                    return True
                return False
        return True


_installed = False


def quiet() -> None:
    """Install the filters above (once per process)."""
    global _installed
    if _installed:
        return
    _installed = True
    for table, once in ((DROPPED, False), (ONCE, True)):
        by_logger: dict[str, list[str]] = {}
        for name, piece in table:
            by_logger.setdefault(name, []).append(piece)
        for name, pieces in by_logger.items():
            logging.getLogger(name).addFilter(_Filter(pieces, once))
