"""Export a run's newest checkpoint for use outside orch (trainer/export.py holds the mapping). Named
exporting, not export, so that the package's `api.export` is the function, as planning.py is for `api.plan`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.api.connection import RUN_PREFIX
from orchestrator.api.runs import Db, find_run

if TYPE_CHECKING:
    from trainer.export import Exported


def checkpoint_of(run: str, *, db: Db = None) -> Path:
    """The checkpoint `run` names: a checkpoint file, a run directory's newest complete checkpoint, or (for a
    run id prefix, looked up in the database as `orch logs` does) that run's newest complete checkpoint."""
    from trainer.export import checkpoint_in

    if Path(run).exists():  # a path first: a folder named like a run id (`runs/` holds them) is that folder
        return checkpoint_in(run)
    if not RUN_PREFIX.fullmatch(run):
        raise ValueError(f"{run!r} is neither a run id (a prefix of one, see `orch ls`) nor a run directory or file")
    r = find_run(run, db=db)
    run_dir = Path(r.run_dir or f"runs/{r.id}")
    if not run_dir.is_dir():
        raise ValueError(
            f"run {r.id} ({r.state}) has no run directory at {run_dir} here: run `orch export` where its "
            "runs/ folder is (or give the path of its run directory)"
        )
    return checkpoint_in(run_dir)


def export(run: str, out: str | Path, *, format: str = "hf", force: bool = False, db: Db = None) -> Exported:
    """Write `run`'s newest checkpoint to the folder `out` in `format` ("hf": a Hugging Face transformers
    GPT2LMHeadModel with its tokenizer, checked to give orch's logits). `run`: a run id prefix, a run
    directory or a checkpoint file. A folder that exists and is not empty is replaced only with `force`."""
    from trainer.export import FORMATS
    from trainer.export import export as export_checkpoint

    if format not in FORMATS:  # before any lookup: the cheapest mistake is reported first
        raise ValueError(f"--format must be {' or '.join(FORMATS)} (Hugging Face transformers), not {format!r}")
    return export_checkpoint(checkpoint_of(run, db=db), out, format=format, force=force)
