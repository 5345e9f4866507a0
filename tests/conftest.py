"""One compose fixture with CPU / tiny settings; every run writes under pytest's tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline import compose
from pipeline.runner import run

# never reach for a hub from the tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Synthetic checkpoints built once per test session."""
    return tmp_path_factory.mktemp("qload-cache")


@pytest.fixture
def load(cache_dir, tmp_path):
    """load(*overrides) -> (model, record, run_dir): the pipeline on the CPU (`device_map=cpu` unless an override
    sets the device map, its policy or its budget: on a GPU machine `auto` would place the model on the GPU),
    records under tmp_path."""
    counter = iter(range(1000))

    def _load(*overrides: str):
        cpu = [] if any(o.lstrip("+~").startswith("device_map") for o in overrides) else ["device_map=cpu"]
        cfg = compose([f"cache_dir={cache_dir}", "stages.stream.progress=false", *cpu, *overrides])
        run_dir = tmp_path / f"run{next(counter)}"
        model, record = run(cfg, run_dir)
        return model, record, run_dir

    return _load


@pytest.fixture
def no_c_compiler(tmp_path, monkeypatch):
    """A machine with no C compiler ($CC, CXX and PATH point at nothing) and no build of the C kernels (none from
    install, an empty cache): the kernels must fall back to bitsandbytes' own op."""
    from stages.backends.bnb import kernels

    nothing = tmp_path / "nothing"
    nothing.mkdir()
    for var in ("CC", "CXX"):
        monkeypatch.setenv(var, str(nothing / "cc"))
    monkeypatch.setenv("PATH", str(nothing))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(kernels, "PREBUILT", "_not_built")
    monkeypatch.setattr(kernels, "_said_fallback", False)
    kernels.library.cache_clear()
    yield
    kernels.library.cache_clear()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked requires_cuda are skipped, with the reason, where torch sees no GPU."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="requires_cuda: torch.cuda.is_available() is False on this machine")
    for item in items:
        if item.get_closest_marker("requires_cuda"):
            item.add_marker(skip)
