"""The ServerApp: read the run config, build the strategy, run the rounds.

``flwr run`` finds it through pyproject.toml's ``[tool.flwr.app.components]``; the run
config (``[tool.flwr.app.config]`` plus ``--run-config`` overrides) holds every
ferret-fl setting and the app's own keys (``settings.APP_DEFAULTS``).
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from .settings import parse
    from .strategy import FerretFlowerStrategy

    cfg, settings = parse(context.run_config)
    strategy = FerretFlowerStrategy(cfg, settings)
    if settings.resume:
        strategy.restore()
    strategy.start(grid)
