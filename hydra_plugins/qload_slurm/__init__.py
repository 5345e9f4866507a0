"""`hydra/launcher=slurm` and `slurm_gpu`: hydra-submitit-launcher's Slurm launcher, with qload's waiting and
failure records (`pipeline.cluster`). It lives in `hydra_plugins` because Hydra instantiates launchers from
that package only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher


class QloadSlurmLauncher(SlurmLauncher):
    """One Slurm job per sweep job (a job array); the sweep waits for all of them and records the ones Slurm
    ended (time limit, memory, scancel) with Slurm's reason."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        from pipeline import cluster

        return cluster.launch(self, [list(o) for o in job_overrides], initial_job_idx)
