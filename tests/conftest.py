"""One compose fixture with CPU / tiny settings; every run writes under pytest's tmp_path."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from pipeline import compose
from pipeline.runner import run

# never reach for a hub from the tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from .helpers import REPO  # noqa: E402,F401


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Synthetic checkpoints built once per test session."""
    return tmp_path_factory.mktemp("qload-cache")


@pytest.fixture
def load(cache_dir, tmp_path):
    """load(*overrides) -> (model, record, run_dir): the pipeline on the CPU, records under tmp_path."""
    counter = iter(range(1000))

    def _load(*overrides: str):
        cfg = compose([f"cache_dir={cache_dir}", "stages.stream.progress=false", *overrides])
        run_dir = tmp_path / f"run{next(counter)}"
        model, record = run(cfg, run_dir)
        return model, record, run_dir

    return _load


def weights(model) -> dict[str, torch.Tensor]:
    """Every tensor that defines the loaded model, quantization state included, as raw bytes on the CPU."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        out[name] = t.view(torch.uint8) if t.dtype != torch.bool and t.numel() else t
    return out


def assert_same_weights(a, b) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs"


def file_digests(folder: Path) -> dict[str, str]:
    """Every file under `folder` by its SHA-256: equal before and after a run means nothing was written."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(2**24):
                h.update(chunk)
        out[str(path.relative_to(folder))] = h.hexdigest()
    return out
