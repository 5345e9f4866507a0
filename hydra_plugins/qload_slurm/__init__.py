"""`hydra/launcher=slurm` and `slurm_gpu`: hydra-submitit-launcher's Slurm launcher, with qload's waiting and
failure records (`pipeline.cluster`). It lives in `hydra_plugins` because Hydra instantiates launchers from
that package only."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from typing import Any

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher


class QloadSlurmLauncher(SlurmLauncher):
    """One Slurm job per sweep job (a job array); the sweep waits for all of them and records the ones Slurm
    ended (time limit, memory, scancel) with Slurm's reason."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # In the job. submitit asks Slurm for SIGUSR2 `signal_delay_s` before the time limit, to checkpoint and
        # requeue; a load cannot resume, and the signal reaches every process of the step, where its default
        # action would kill the load early. Ignored here, and so in the load processes spawned after this
        # (an ignored signal stays ignored across exec): the job runs until Slurm's limit ends it.
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        return super().__call__(*args, **kwargs)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        from pipeline import cluster

        return cluster.launch(self, [list(o) for o in job_overrides], initial_job_idx)
