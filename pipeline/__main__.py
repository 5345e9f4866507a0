"""`python -m pipeline [group=option ...] [key=value ...]`: load a model as the config says, record the run.

Each run (and each job of a `-m` sweep) loads in a fresh process (`pipeline.isolate`), so this process stays
small and every record's peak memory is that load's own. Exit status: 0 ok, 1 a stage failed, 3 the prompt's
generation failed, 4 a run record could not be written (disk full, out of memory), 130 interrupted (Ctrl-C),
128+N the load was killed by signal N (137: SIGKILL, e.g. the OOM killer).
"""

# Everything under the guard (the work itself is in pipeline/cli.py): multiprocessing's spawn starts each load
# process by importing this module again, as `__mp_main__`, and that import must cost the load nothing.
if __name__ == "__main__":
    import sys

    from pipeline import ctrl_c, startup

    ctrl_c.remember()  # first: a Ctrl-C from here on is known, even where a library swallows it (ctrl_c.py)
    startup.start_early(sys.argv[1:])  # the load process imports torch while this one composes (startup.py)

    import hydra
    from omegaconf import DictConfig

    from pipeline import CONF_DIR, cli

    # defined here, in this file: Hydra names the job after the task function's file (`__main__`: the job's
    # log is `__main__.log`, a Slurm job's name `__main__`)
    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def main(cfg: DictConfig) -> None:
        cli.run_job(cfg)

    cli.run_main(main)
