"""The package as pip installs it: the wheel carries every config of conf/ (as `pipeline/conf`) and the bundled
eval text, and `python -m pipeline` run from that layout, in another folder, finds its configs there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO

EVAL_TEXT = "pipeline/quality/data/eval.txt"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip install .` would install, built offline from a copy of the checkout (so that the build's
    own build/ and egg-info folders stay out of it)."""
    pytest.importorskip("setuptools", minversion="68")  # what pyproject.toml's build-system requires
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in ("pipeline", "stages", "conf"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-q"]
    proc = subprocess.run([*cmd, "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (built,) = (tmp / "dist").glob("qload-*.whl")
    return built


def test_the_wheel_carries_every_config_and_the_eval_text(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"pipeline/conf/{p.relative_to(REPO / 'conf')}" for p in (REPO / "conf").rglob("*.yaml")}
    assert len(configs) > 30  # every group's options, the experiments, the launchers
    assert {n for n in names if n.endswith(".yaml")} == configs
    assert EVAL_TEXT in names and zipfile.ZipFile(wheel).read(EVAL_TEXT) == (REPO / EVAL_TEXT).read_bytes()
    assert not any(n.startswith(("conf/", "tests/")) for n in names)


def test_the_installed_layout_runs_from_another_folder_with_its_own_configs(wheel, tmp_path, cache_dir):
    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    zipfile.ZipFile(wheel).extractall(site)  # what a non-editable install puts in site-packages
    elsewhere.mkdir()
    env = os.environ | {"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}  # not the checkout
    where = subprocess.run(
        [sys.executable, "-c", "import pipeline; print(pipeline.__file__); print(pipeline.CONF_DIR)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.stdout.split() == [str(site / "pipeline" / "__init__.py"), str(site / "pipeline" / "conf")]
    # a plan reads no weight: the whole CLI, configs composed from the package, in seconds
    cmd = [sys.executable, "-m", "pipeline", "plan=true", f"cache_dir={cache_dir}"]
    proc = subprocess.run(cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "  predicted peak" in proc.stdout
    (run_json,) = (elsewhere / "runs").glob("*/*_tiny_llama_nf4/run.json")  # hydra.run.dir: under the cwd
    assert json.loads(run_json.read_text())["status"] == "planned"


def test_an_install_without_its_configs_says_where_it_looked(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    shutil.rmtree(site / "pipeline" / "conf")
    env = os.environ | {"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipeline"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 1
    assert f"error: no config.yaml in {site / 'pipeline' / 'conf'} (an installed package) nor in {site / 'conf'}" in (
        proc.stderr
    )
