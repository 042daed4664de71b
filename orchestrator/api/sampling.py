"""`orch sample`: completions of any prompt by a run's newest checkpoint (trainer/sample.py generates). Named
sampling, not sample, so that the package's `api.sample` is the function, as exporting.py is for `api.export`.

A succeeded run's newest checkpoint holds its final weights (the trainer checkpoints after its test
evaluation), so `orch sample RUN` of a finished run completes with the model its samples.json and test loss
came from; a running or stopped run gives its latest checkpoint. Generation runs here on the CPU in fp32: a
completion made on a GPU, or under eval.amp=bf16, may differ from this one in a token where two were nearly
tied."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.api.connection import RUN_PREFIX, at_least
from orchestrator.api.runs import Db, find_run

if TYPE_CHECKING:
    from trainer.sample import Sample


@dataclass
class Sampled:
    checkpoint: Path
    step: int  # the optimizer step of the weights
    samples: list[Sample]  # per prompt, its completions in seed order


def checkpoint_to_sample(run: str, *, db: Db = None) -> Path:
    """The checkpoint `run` names: a checkpoint file, a run directory's newest complete checkpoint, or (for a
    run id prefix, looked up in the database as `orch logs` does) that run's newest complete checkpoint."""
    from trainer import checkpoint

    path = Path(run)
    if path.is_file():
        return path
    if path.is_dir():  # a path first: a folder named like a run id (`runs/` holds them) is that folder
        run_dir, what = path, str(path)
    elif RUN_PREFIX.fullmatch(run):
        r = find_run(run, db=db)
        run_dir, what = Path(r.run_dir or f"runs/{r.id}"), f"run {r.id} ({r.state})"
        if not run_dir.is_dir():
            raise ValueError(
                f"{what} has no run directory at {run_dir} here: run `orch sample` where its runs/ folder is "
                "(or give the path of its run directory)"
            )
    else:
        raise ValueError(f"{run!r} is neither a run id (a prefix of one, see `orch ls`) nor a run directory or file")
    latest = checkpoint.latest(run_dir)
    if latest is None:
        raise ValueError(
            f"{what} has no checkpoint yet (checkpoints/step_*.pt): sample it once it has written one (every "
            "run.checkpoint_interval steps, and at its end), or give another run"
        )
    return latest


def sample(
    run: str,
    prompts: str | list[str],
    *,
    tokens: int = 40,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    count: int = 1,
    db: Db = None,
) -> Sampled:
    """Complete each prompt `count` times with `run`'s newest checkpoint (`run`: a run id prefix, a run
    directory or a checkpoint file): greedy at temperature 0 (one completion), else sampled from
    softmax(logits / temperature) over the top_k likeliest tokens (all with None), the i-th completion with
    seed + i, so that `seed=S + i, count=1` repeats it alone."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    # The cheapest mistakes first, before a database lookup or a checkpoint load.
    if not prompts or any(not p for p in prompts):
        raise ValueError("--prompt is empty: give the text to complete, e.g. --prompt 'Every effort moves you'")
    at_least("--tokens", tokens, example="40")
    if not temperature >= 0:  # `not >=` also refuses NaN
        raise ValueError(f"--temperature must be 0 (greedy) or more, e.g. 0.8, not {temperature:g}")
    if top_k is not None:
        at_least("--top-k", top_k, example="50")
    at_least("--seed", seed, minimum=0, example="0")
    at_least("--count", count, example="3")
    if temperature == 0 and (count > 1 or top_k is not None):
        raise ValueError(
            "--temperature 0 is greedy decoding: one completion, always the likeliest token, so --count and "
            "--top-k change nothing; give --temperature (e.g. 0.8) to sample"
        )
    from trainer.sample import complete, load_model

    path = checkpoint_to_sample(run, db=db)
    model, _, step = load_model(path)
    out = []
    for prompt in prompts:
        for i in range(count):
            out.append(complete(model, prompt, tokens, temperature=temperature, top_k=top_k, seed=seed + i))
    return Sampled(path, step, out)
