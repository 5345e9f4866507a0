"""The shared cache's build lock (pipeline/core/cachelock.py): processes that need the same not-yet-built synthetic
checkpoint at once build it once and all use it; a builder killed mid-way leaves nothing that looks complete,
and the next process takes its lock over and builds; a lock from another host is kept while its heartbeat
goes on and taken over when it stops."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.checkpoints import synthetic
from pipeline.core import cachelock

# not imported from tests.conftest: a spawned child imports this module, and conftest imports torch
_SPAWN = multiprocessing.get_context("spawn")


def _tiny() -> tuple[str, dict, dict]:
    from pipeline import compose

    cfg = compose([])
    syn = OmegaConf.to_container(OmegaConf.structured(cfg.model.synthetic), resolve=True)
    return cfg.model.name, OmegaConf.to_container(cfg.model.architecture), syn


def _digest(folder: Path) -> str:
    """Every tensor of the checkpoint, as loaded by safetensors."""
    import torch
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for shard in sorted(folder.glob("*.safetensors")):
        for name, t in sorted(load_file(shard).items()):
            h.update(name.encode())
            h.update(t.contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _job(spec: tuple, cache_dir: Path, counter: Path, go: Path, delay_s: float, out) -> None:
    """One job needing the checkpoint: every shard it writes is counted (and slowed, so that the others
    arrive while it builds); it waits for `go` so that all start together, then loads what it got."""
    real = synthetic._write_shard

    def counted(path: Path, *args, **kwargs) -> None:
        with open(counter, "a") as f:
            f.write(f"{os.getpid()} {path.name}\n")
        time.sleep(delay_s)
        real(path, *args, **kwargs)

    synthetic._write_shard = counted
    out.put(("ready", os.getpid()))
    while not go.exists():
        time.sleep(0.01)
    target = synthetic.materialize(*spec, cache_dir)
    out.put(("done", os.getpid(), str(target), _digest(target), cachelock.events()))


def _builders(counter: Path) -> dict[int, int]:
    """pid -> shards it wrote."""
    counts: dict[int, int] = {}
    for line in counter.read_text().splitlines():
        pid = int(line.split()[0])
        counts[pid] = counts.get(pid, 0) + 1
    return counts


def test_four_processes_needing_the_same_checkpoint_build_it_once_and_all_load_it(tmp_path):
    spec, cache, counter, go = _tiny(), tmp_path / "cache", tmp_path / "writes", tmp_path / "go"
    out = _SPAWN.Queue()
    procs = [_SPAWN.Process(target=_job, args=(spec, cache, counter, go, 0.3, out)) for _ in range(4)]
    for p in procs:
        p.start()
    assert sorted(out.get(timeout=120)[0] for _ in procs) == ["ready"] * 4
    go.touch()  # all four ask for the checkpoint at once
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    builders = _builders(counter)
    assert len(builders) == 1, f"built by {len(builders)} processes: {builders}"
    target = synthetic.folder(*spec, cache)
    n_shards = len(list(target.glob("*.safetensors")))
    assert n_shards > 1 and list(builders.values()) == [n_shards]  # one whole build, no second start
    assert {r[2] for r in results} == {str(target)}
    assert len({r[3] for r in results}) == 1 and results[0][3] == _digest(target)  # all four loaded the same
    events = [r[4] for r in results]
    assert sorted(len(e) for e in events) == [1, 1, 1, 1]
    built = [e[0] for e in events if e[0]["built"]]
    waited = [e[0] for e in events if not e[0]["built"]]
    assert len(built) == 1 and len(waited) == 3
    # the others really overlapped the build: they waited for it rather than finding it done
    assert all(w["waited_s"] > 0.2 for w in waited), waited
    assert not cachelock.lock_path(target).exists()
    assert [p.name for p in cache.joinpath("synthetic").iterdir()] == [target.name]  # no partial left


def test_a_builder_killed_mid_way_leaves_nothing_complete_and_the_next_job_takes_over(tmp_path):
    spec, cache, counter, go = _tiny(), tmp_path / "cache", tmp_path / "writes", tmp_path / "go"
    go.touch()
    out = _SPAWN.Queue()
    builder = _SPAWN.Process(target=_job, args=(spec, cache, counter, go, 3.0, out))
    builder.start()
    deadline = time.monotonic() + 120
    while not (counter.exists() and len(counter.read_text().splitlines()) >= 2):  # into its second shard
        assert time.monotonic() < deadline and builder.is_alive()
        time.sleep(0.05)
    os.kill(builder.pid, signal.SIGKILL)
    builder.join()
    target = synthetic.folder(*spec, cache)
    lock = cachelock.lock_path(target)
    left = sorted(p.name for p in target.parent.iterdir())
    assert not target.exists()  # nothing under the checkpoint's name, so nothing a later job could take
    assert left == sorted([f".{target.name}.partial-{builder.pid}", lock.name])
    assert json.loads(lock.read_text())["pid"] == builder.pid  # a stale lock: its owner is dead

    taken = synthetic.materialize(*spec, cache)  # the next job, in this process
    assert taken == target and (target / "config.json").exists()
    event = cachelock.events()[-1]
    assert event["built"] and event["took_over"].endswith(f"pid {builder.pid}")
    assert event["removed_partials"] == [f".{target.name}.partial-{builder.pid}"]
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
    clean = synthetic.materialize(*spec, tmp_path / "clean")
    assert _digest(target) == _digest(clean)  # the taken-over build is whole


def test_a_lock_from_another_host_is_kept_while_its_heartbeat_goes_on(tmp_path):
    target = tmp_path / "thing"
    lock = cachelock.lock_path(target)
    owner = {"host": "another-node", "pid": os.getpid(), "start": 0.0, "token": "t"}
    lock.write_text(json.dumps(owner))  # our pid, but on another host: the pid says nothing there
    stop = threading.Event()

    def beat() -> None:  # the owner on the other node, alive for 2 s
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            os.utime(lock)
            time.sleep(0.1)

    heart = threading.Thread(target=beat)
    heart.start()
    t0 = time.monotonic()
    with cachelock.exclusive(target, poll_s=0.05, stale_s=1.0) as facts:
        held_after = time.monotonic() - t0
        assert json.loads(lock.read_text())["pid"] == os.getpid() and json.loads(lock.read_text())["token"] != "t"
    stop.set()
    heart.join()
    assert 2.8 <= held_after < 10  # waited through the heartbeat, then a whole stale period
    assert facts["took_over"] == f"another-node pid {os.getpid()}"
    assert not lock.exists()


def test_a_live_owner_on_this_host_is_waited_for_not_taken_over(tmp_path):
    target = tmp_path / "thing"
    lock = cachelock.lock_path(target)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with cachelock.exclusive(target):
            holding.set()
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait(10)
    threading.Timer(1.5, release.set).start()
    t0 = time.monotonic()
    with cachelock.exclusive(target, poll_s=0.05, stale_s=0.1) as facts:  # staleness never applies to a live pid
        waited = time.monotonic() - t0
    holder.join()
    assert waited >= 1.4 and facts["took_over"] is None
    assert not lock.exists()


def test_four_sweep_jobs_at_once_on_a_fresh_cache_load_one_checkpoint_built_once(tmp_path):
    """The same through the whole pipeline: four jobs of a local-launcher sweep (each its own process, all
    started at once) on an empty cache_dir. Whether the others wait for the build or find it done depends on
    timing; the test above makes them overlap for certain."""
    from tests.helpers import sweep

    proc, records = sweep(
        tmp_path / "sweep",
        tmp_path / "cache",
        "hydra/launcher=local",
        "model.architecture.hidden_size=1024",
        "model.architecture.intermediate_size=2816",
        "quant=nf4,fp4,int8,nf4_double",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(records) == [0, 1, 2, 3] and all(r["status"] == "ok" for r in records.values())
    assert len({r["checkpoint"]["fingerprint"] for r in records.values()}) == 1
    events = [e for r in records.values() for e in r.get("cache", [])]
    assert [e["built"] for e in events].count(True) == 1, events
    assert len({r["process"]["pid"] for r in records.values()}) == 4
    print(f"4 jobs: 1 built, {len(events) - 1} waited for it, {4 - len(events)} found it done")
