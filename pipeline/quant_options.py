"""The quant group's options, named in the error for one that does not exist.

`quant=<backend>/<scheme>` lives one folder down (conf/quant/<backend>/<scheme>.yaml), so Hydra's own error for
`quant=hqq/b5` lists only the top-level short names (nf4, fp4, ...): neither hqq's schemes nor the backends.
`compose` asks this module first, so the CLI (its guard composes before Hydra acts) and `load()` both refuse an
unknown scheme with the valid schemes of its backend, and an unknown backend with the backends. The options are
the YAML files in conf/quant/, as Hydra would find them; schemas are not options.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.schema import is_schema_option


def _options(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml") if not is_schema_option(p.stem))


def every_option(quant_dir: Path) -> list[str]:
    """Every quant option: conf/quant/<option>.yaml and conf/quant/<backend>/<scheme>.yaml, schemas left out."""
    found = [p.relative_to(quant_dir).with_suffix("").as_posix() for p in quant_dir.rglob("*.yaml")]
    return sorted(o for o in found if not is_schema_option(o.rpartition("/")[2]))


def backends(quant_dir: Path) -> list[str]:
    """The backends a `quant=<backend>/<scheme>` may name: the folders of conf/quant/."""
    return sorted(p.name for p in quant_dir.iterdir() if p.is_dir() and _options(p))


def unknown_quant(value: str, quant_dir: Path) -> str | None:
    """Why `quant=<value>` names no option, with the valid ones; None when conf/quant/<value>.yaml exists."""
    if (quant_dir / f"{value}.yaml").is_file() or is_schema_option(value.rpartition("/")[2]):
        return None  # an option, or a schema (refused by the guard's own check, with the group's options)
    found = backends(quant_dir)
    if "/" in value:
        backend, _, scheme = value.rpartition("/")
        if backend in found:
            schemes = ", ".join(f"{backend}/{s}" for s in _options(quant_dir / backend))
            return f"quant={value}: {scheme!r} is not a scheme of the {backend} backend; valid: {schemes}"
        return f"quant={value}: {backend!r} is not a quantization backend; valid backends: {', '.join(found)}"
    return (
        f"quant={value}: not a quant option; valid: {', '.join(_options(quant_dir))}, or <backend>/<scheme> "
        f"with a backend of {', '.join(found)} (python -m pipeline --help lists every scheme)"
    )


def check_overrides(overrides: list[str], quant_dir: Path) -> str | None:
    """The error for the first `quant=...` override that names no option, if any (sweep values are checked
    job by job, as the CLI's guard composes each job)."""
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and key.lstrip("+") == "quant" and not key.startswith("~") and "," not in value:
            problem = unknown_quant(value.strip(), quant_dir)
            if problem:
                return problem
    return None
