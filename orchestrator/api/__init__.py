"""The Python API: what every `orch` command does, as functions a notebook can call.

    from orchestrator import api
    api.submit("experiments/quickstart.py", preset="tiny")
    api.worker(until_empty=True, parallel=2, track=False)
    print(api.table("quickstart"))

Each function takes plain values — `db` an SQLAlchemy URL or an open Engine (default $ORCH_DB, else
sqlite:///results.db), `mlflow` a tracking URI (default $ORCH_MLFLOW, else sqlite:///mlflow.db), `track`
False for no MLflow — and returns a typed record. An input a user can fix is refused with a ValueError (or
its subclass SpecError), a database problem with a SchemaError, each one line naming the fix;
`user_message(exc)` gives that line for any of them.
"""

from orchestrator.api.connection import connect, user_message
from orchestrator.api.describe import RunDiff, RunView, diff, show
from orchestrator.api.exporting import export
from orchestrator.api.monitoring import Running, Status, eta_s, status
from orchestrator.api.notes import note, tag
from orchestrator.api.planning import ArmPower, Design, Plan, SigmaSource, plan
from orchestrator.api.results import (
    ImportReport,
    Leaderboard,
    Suggestions,
    import_results,
    more_seeds,
    noise,
    report,
    suggest,
    table,
)
from orchestrator.api.runs import (
    CancelReport,
    Log,
    SyncReport,
    WorkerReport,
    cancel,
    find_run,
    logs,
    ls,
    retry,
    sync,
    ui,
    upgrade,
    worker,
)
from orchestrator.api.sampling import Sampled, sample
from orchestrator.api.slurm import slurm_workers
from orchestrator.api.submitting import Submitted, submit
from orchestrator.api.sweeps import sweep_confirm, sweep_plot, sweep_run, sweep_status
from orchestrator.more_seeds import Round

__all__ = [
    "RunDiff",
    "RunView",
    "diff",
    "export",
    "note",
    "show",
    "tag",
    "ArmPower",
    "Design",
    "Plan",
    "SigmaSource",
    "plan",
    "CancelReport",
    "ImportReport",
    "Leaderboard",
    "Log",
    "Round",
    "Running",
    "Status",
    "Submitted",
    "Suggestions",
    "SyncReport",
    "WorkerReport",
    "cancel",
    "connect",
    "eta_s",
    "find_run",
    "import_results",
    "logs",
    "ls",
    "more_seeds",
    "noise",
    "report",
    "retry",
    "status",
    "submit",
    "suggest",
    "sweep_confirm",
    "sweep_plot",
    "sweep_run",
    "sweep_status",
    "sync",
    "table",
    "ui",
    "upgrade",
    "user_message",
    "worker",
    "slurm_workers",
    "Sampled",
    "sample",
]
