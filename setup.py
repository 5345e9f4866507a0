"""What pyproject.toml cannot say: the Hydra configs live in conf/ at the repository's top level (where a
checkout edits them and `python -m pipeline` finds them), and ship inside the package as `pipeline/conf`,
where an installed `pipeline` finds them (`pipeline.CONF_DIR`)."""

from setuptools import find_namespace_packages, find_packages, setup

setup(
    packages=[
        *find_packages(include=["pipeline", "pipeline.*", "stages", "stages.*"]),
        # the Slurm launcher and the budget search's sweeper: Hydra takes plugins from its namespace only
        *find_namespace_packages(include=["hydra_plugins.qload_slurm", "hydra_plugins.qload_optuna"]),
        "pipeline.conf",
    ],
    package_dir={"pipeline.conf": "conf"},
)
