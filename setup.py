"""What pyproject.toml cannot say: the Hydra configs live in conf/ at the repository's top level (where a
checkout edits them and `python -m pipeline` finds them), and ship inside the package as `pipeline/conf`,
where an installed `pipeline` finds them (`pipeline.CONF_DIR`); and the CPU quantization kernels
(stages/backends/bnb/qkernels.c) are compiled here, at install, so that a load needs no compiler.

The kernels are a plain C shared library that stages/backends/bnb/kernels.py opens with ctypes (no Python or
torch headers: it builds in about a second). The extension is optional: where the build fails (no C compiler),
the install goes on, and the kernels are built on first use if a compiler appears, or bitsandbytes' own op runs.
"""

import hashlib
from pathlib import Path

from setuptools import Extension, find_namespace_packages, find_packages, setup

KERNELS = "stages/backends/bnb/qkernels.c"
# the hash kernels.py compares with the library's, to never run a build of another version of the source
SOURCE_ID = hashlib.sha256((Path(__file__).parent / KERNELS).read_bytes()).hexdigest()[:16]

setup(
    packages=[
        *find_packages(include=["pipeline", "pipeline.*", "stages", "stages.*"]),
        # the Slurm launcher and the budget search's sweeper: Hydra takes plugins from its namespace only
        *find_namespace_packages(include=["hydra_plugins.qload_slurm", "hydra_plugins.qload_optuna"]),
        "pipeline.conf",
    ],
    package_dir={"pipeline.conf": "conf"},
    ext_modules=[
        Extension(
            "stages.backends.bnb._qkernels",
            [KERNELS],
            define_macros=[("QLOAD_SOURCE_ID", f'"{SOURCE_ID}"')],
            extra_compile_args=["-O3", "-ffp-contract=off"],  # as kernels.COMPILE_FLAGS: exact float32 steps
            libraries=["m"],
            optional=True,
        )
    ],
)
