"""`orch`: a thin typer layer over orchestrator.api, one module per group of commands (common.py: the app,
its options and one-line errors)."""

# Each module registers its commands on the app, in the order `orch --help` lists them.
from orchestrator.cli import runs  # noqa: F401  isort: skip
from orchestrator.cli import describe  # noqa: F401  isort: skip
from orchestrator.cli import notes  # noqa: F401  isort: skip
from orchestrator.cli import results  # noqa: F401  isort: skip
from orchestrator.cli import plan  # noqa: F401  isort: skip
from orchestrator.cli import sweep  # noqa: F401  isort: skip
from orchestrator.cli import slurm  # noqa: F401  isort: skip
from orchestrator.cli import export  # noqa: F401  isort: skip
from orchestrator.cli import sample  # noqa: F401  isort: skip
from orchestrator.cli.common import app

__all__ = ["app"]
