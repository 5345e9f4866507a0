"""`hydra/sweeper=qload_optuna`: a budget search over quantization settings, on Optuna's ask-and-tell API.

It lives in `hydra_plugins` because Hydra instantiates sweepers from that package only; the work is in
`pipeline.search`. Not hydra-optuna-sweeper: its 1.3 release pins optuna 2.10, whose SQLite storage fails
with the SQLAlchemy installed beside it, and a study that cannot be stored cannot resume.

Hydra imports this module on every start (it scans `hydra_plugins`), so it imports neither Optuna nor
torch; it registers the settings' schema, which `conf/hydra/sweeper/qload_optuna.yaml` names.
"""

from __future__ import annotations

from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from pipeline.core.schema import SCHEMA_GROUP
from pipeline.search.settings import SearchSettings

ConfigStore.instance().store(group=f"{SCHEMA_GROUP}/hydra/sweeper", name="qload_optuna", node=SearchSettings)


class QloadOptunaSweeper(Sweeper):
    """Hydra's side of the budget search: builds the launcher, then hands the study to
    `pipeline.search.sweep.BudgetSearch`."""

    def __init__(self, **settings: Any) -> None:
        super().__init__()
        node = OmegaConf.merge(OmegaConf.structured(SearchSettings), settings)
        self.settings: SearchSettings = OmegaConf.to_object(node)  # runs the settings' own checks

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        from pipeline.search.sweep import BudgetSearch

        BudgetSearch(self.settings, self.config, self.launcher, self.hydra_context.config_loader, arguments).run()
