"""Longer contexts and runs that start from another run (run.init_from): data windows, the evaluation batch,
the test slice in tokens, the micro-batch finder and accumulation, the position table's extension, refused
sources, resume from the run's own checkpoint, and the orchestrator's wait for a source run."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from orchestrator import dependencies, queries, queue, runspec, specs, submission
from orchestrator.db import connect
from orchestrator.specs import Experiment, Intervention, SpecError
from tests.conftest import (
    FAST,
    ok,
    read_result,
    run_trainer,
    start_trainer,
    train_losses,
    wait_for_step,
)
from trainer import checkpoint, config, identity, init_from, presets
from trainer.config import ConfigError
from trainer.data import Split
from trainer.distributed import Dist
from trainer.evaluate import mean_loss, sequences_per_pass
from trainer.model import GPT
from trainer.perf import find_micro_batch
from trainer.rundir import read_metrics, write_json

LONG = 192  # 3 × the tiny preset's 64-token context (1,024 → 3,072 in the seed repo's run)
NO_SAMPLES = {"sample.prompts": []} if "sample" in config.TrainConfig.model_fields else {}


def tiny(**sets) -> config.TrainConfig:
    return presets.load(preset_name="tiny", overrides={"data.path": "unused", **NO_SAMPLES, **sets})


def save_source(run_dir: Path, cfg: config.TrainConfig, seed: int = 1, step: int = 7, finished: bool = True) -> Path:
    """A trainer checkpoint of a freshly initialised model (and result.json: a finished run directory)."""
    run_dir.mkdir(parents=True)
    torch.manual_seed(seed)
    state = {"model": GPT(cfg.model).state_dict(), "config": cfg.model_dump(mode="json")}
    path = checkpoint.save(run_dir, step, state, keep=1)
    write_json(run_dir / "config.json", cfg.model_dump(mode="json"))
    if finished:
        write_json(run_dir / "result.json", {"status": "succeeded", "step": step})
    return path


# ---------------------------------------------------------------------------------------------------------
# Longer contexts: windows, the test slice in tokens, the evaluation batch, the finder, accumulation


def test_long_windows_read_context_plus_one_tokens_and_score_the_same_targets(data_dir):
    test = Split(data_dir, "test")
    x, y = test.sequences(range(8), LONG)
    assert x.shape == y.shape == (8, LONG) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y[0, -1:], x[1, :1])  # consecutive windows share one token: T + 1 read, T predicted
    _, short_targets = test.sequences(range(24), 64)  # the 1,024-context analogue: 3 × as many windows
    assert torch.equal(y.flatten(), short_targets.flatten())  # the same targets, in the same order


def test_test_slice_in_tokens_is_a_config_alternative():
    cfg = tiny(**{"model.context_length": LONG, "eval.test_tokens": 96 * 64})  # tiny's 96 windows of 64 tokens
    assert cfg.eval.test_sequences is None and cfg.test_windows() == 32
    assert tiny().test_windows() == 128 and tiny().eval.test_tokens is None
    back = presets.load(preset_name="tiny", overrides={"eval.test_tokens": 4096, "eval.test_sequences": None})
    assert (
        presets.apply_overrides(back.model_dump(mode="json"), {"eval.test_sequences": 8})["eval"]["test_tokens"] is None
    )
    with pytest.raises(ConfigError, match=r"eval.test_tokens \(1000\) must be a multiple of model.context_length"):
        tiny(**{"eval.test_tokens": 1000})
    # A run's id is the slice it is tested on, however written: 8,192 tokens at 64 are tiny's 128 windows.
    spelt = tiny(**{"eval.test_tokens": 128 * 64})
    assert runspec.run_id(spelt, 0) == runspec.run_id(tiny(), 0) and identity.same_run(spelt.model_dump(), tiny())
    assert runspec.run_id(tiny(**{"eval.test_tokens": 64 * 64}), 0) != runspec.run_id(tiny(), 0)


def test_evaluation_batch_follows_the_context(data_dir):
    """eval.batch_size counts 1,024-token sequences: 16 of 1,024, 5 of 3,072, so the logits never outgrow what
    the batch size was chosen for."""
    assert [sequences_per_pass(16, t) for t in (64, 1024, 2048, 3072, 40000)] == [16, 16, 8, 5, 1]
    cfg = tiny(**{"model.context_length": 1100})
    torch.manual_seed(0)
    model = GPT(cfg.model)
    test, seen = Split(data_dir, "test"), []
    real = test.sequences
    test.sequences = lambda idx, T: seen.append(len(idx)) or real(idx, T)  # records each pass's batch, real reads
    loss = mean_loss(model, test, 1100, 3, batch_size=2, device=torch.device("cpu"))
    assert seen == [1, 1, 1] and 10 < loss < 12  # 2 sequences of 1,024 tokens = 1 of 1,100 per pass; ~ln(50257)


def test_micro_batch_finder_at_a_longer_context():
    """The finder searches the divisors of the per-device batch: at 3 × the context, a third of the memory
    budget's sequences fit (memory here: activations ∝ micro-batch × context, the budget 1,024 tokens)."""

    def fits(context):
        def probe(micro):
            if micro * context > 1024:
                raise torch.OutOfMemoryError("CUDA out of memory (budget of 1,024 tokens)")

        return probe

    assert find_micro_batch(96, fits(64)) == 16 and find_micro_batch(96, fits(LONG)) == 4
    assert find_micro_batch(96, fits(1024)) == 1
    with pytest.raises(RuntimeError, match="shorten model.context_length"):
        find_micro_batch(96, fits(3072))


LONG_RUN = {
    "model.context_length": LONG,
    "eval.test_tokens": 8 * LONG,
    "eval.test_sequences": None,  # conftest's FAST sets it: the test slice is given in tokens instead
    "run.batch_size": 4,
    "run.steps": 4,
}


@pytest.mark.slow
def test_long_context_trains_with_accumulation_as_without(data_dir, tmp_path):
    whole, accum = tmp_path / "whole", tmp_path / "accum"
    ok(run_trainer(whole, data_dir, {**LONG_RUN, "model.dropout": 0.0, **NO_SAMPLES}))
    ok(run_trainer(accum, data_dir, {**LONG_RUN, "model.dropout": 0.0, "run.micro_batch_size": 1, **NO_SAMPLES}))
    a, b = read_result(whole), read_result(accum)
    assert (a["micro_batch_size"], a["grad_accum_steps"], b["micro_batch_size"], b["grad_accum_steps"]) == (4, 1, 1, 4)
    assert a["tokens"] == 4 * 4 * LONG and a["status"] == "succeeded"
    for (sa, la), (sb, lb) in zip(train_losses(whole), train_losses(accum), strict=True):
        assert sa == sb and la == pytest.approx(lb, abs=1e-5)
    assert a["test_loss"] == pytest.approx(b["test_loss"], abs=1e-5)


# ---------------------------------------------------------------------------------------------------------
# The position table, and what a source may differ in


def test_interpolation_and_tiling_are_the_hand_computed_tables():
    P = torch.arange(4 * 2, dtype=torch.float32).reshape(4, 2) ** 2  # rows P0..P3
    mid = lambda a, b: (P[a] + P[b]) / 2  # noqa: E731
    want = torch.stack([P[0], mid(0, 1), P[1], mid(1, 2), P[2], mid(2, 3), P[3]])  # 4 -> 7: j·3/6 = j/2
    assert torch.equal(init_from.extend_positions(P, 7, "interpolate"), want)
    Q = P[:3]  # 3 -> 8: position j·2/7
    w = [(0, 0, 0), (0, 1, 2), (0, 1, 4), (0, 1, 6), (1, 2, 1), (1, 2, 3), (1, 2, 5), (2, 2, 0)]
    want = torch.stack([Q[a] * (7 - k) / 7 + Q[b] * k / 7 for a, b, k in w])
    torch.testing.assert_close(init_from.extend_positions(Q, 8, "interpolate"), want, rtol=0, atol=1e-6)
    assert torch.equal(init_from.extend_positions(P, 10, "tile"), P[[0, 1, 2, 3, 0, 1, 2, 3, 0, 1]])
    assert torch.equal(init_from.extend_positions(P, 3, "interpolate"), P[:3])  # shorter: the first rows


def test_initialise_loads_the_source_with_its_position_table_interpolated(tmp_path):
    source_cfg = tiny()
    path = save_source(tmp_path / "src", source_cfg)
    cfg = tiny(**{"model.context_length": 128, "run.init_from": str(tmp_path / "src"), "model.dropout": 0.0})
    torch.manual_seed(99)
    model = GPT(cfg.model)
    (tmp_path / "new").mkdir()  # the trainer's run directory, where init_from.json goes
    record = init_from.initialise(cfg, tmp_path / "new", Dist(), model)
    src = checkpoint.load(path)["model"]
    for name, value in model.state_dict().items():
        if name != "pos_emb.weight":
            assert torch.equal(value, src[name]), name
    P, got = src["pos_emb.weight"].double(), model.pos_emb.weight.detach()
    for j in range(128):  # by hand: row j sits at j·63/127 of the source's 64 rows
        x = j * 63 / 127
        i = min(int(x), 62)
        assert torch.equal(got[j], ((1 - (x - i)) * P[i] + (x - i) * P[i + 1]).float()), j
    assert torch.equal(got[0], P[0].float()) and torch.equal(got[127], P[63].float())
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (record["source_step"], record["positions"], record["checkpoint"]) == (7, "interpolate", str(path))
    assert json.loads((tmp_path / "new" / "init_from.json").read_text()) == record


def test_rope_has_no_table_to_extend(tmp_path):
    save_source(tmp_path / "src", tiny(**{"model.position": "rope"}))
    cfg = tiny(**{"model.position": "rope", "model.context_length": LONG, "run.init_from": str(tmp_path / "src")})
    (tmp_path / "new").mkdir()
    record = init_from.initialise(cfg, tmp_path / "new", Dist(), GPT(cfg.model))
    assert record["positions"] == "none"
    with pytest.raises(ConfigError, match="model.position=rope has none"):
        tiny(**{"model.position": "rope", "run.init_from": "x", "run.init_positions": "tile"})
    with pytest.raises(ConfigError, match="run.init_positions applies only with run.init_from"):
        tiny(**{"run.init_positions": "tile"})


def test_a_source_of_another_shape_is_refused_naming_each_key(tmp_path):
    save_source(tmp_path / "src", tiny())
    sets = {"model.n_layer": 3, "model.qkv_bias": True, "model.vocab_size": 50000, "model.context_length": LONG}
    cfg = tiny(**sets, **{"run.init_from": str(tmp_path / "src"), "model.dropout": 0.0, "model.init": "pytorch"})
    with pytest.raises(ConfigError) as err:
        init_from.initialise(cfg, tmp_path / "new", Dist(), GPT(cfg.model))
    message = str(err.value)
    for part in ("model.n_layer (source 2, this run 3)", "model.qkv_bias (source False", "model.vocab_size"):
        assert part in message
    assert "context_length (" not in message and "dropout (" not in message and "model.init (" not in message
    assert "may differ from the source" in message


def test_sources_that_are_not_there_yet_are_refused_with_the_fix(tmp_path):
    save_source(tmp_path / "running", tiny(), finished=False)
    with pytest.raises(ConfigError, match=r"not a finished run: it has no result.json .*step_00000007.pt"):
        init_from.resolve(str(tmp_path / "running"))
    with pytest.raises(ConfigError, match="is an orch run id, which only an orch worker resolves"):
        init_from.resolve("0123456789abcdef")
    with pytest.raises(ConfigError, match="does not exist"):
        init_from.resolve(str(tmp_path / "nowhere"))
    path = save_source(tmp_path / "src", tiny())
    cfg = tiny(**{"run.init_from": str(path), "run.init_sha256": "0" * 64})
    with pytest.raises(ConfigError, match="the file changed since"):
        init_from.initialise(cfg, tmp_path / "new", Dist(), GPT(cfg.model))


def test_a_refused_source_stops_the_trainer_before_training(data_dir, tmp_path):
    save_source(tmp_path / "src", tiny())
    run = tmp_path / "run"
    out = run_trainer(run, data_dir, {"run.init_from": str(tmp_path / "src"), "model.n_embd": 128, **NO_SAMPLES})
    ok(out, 2)
    assert "model.n_embd (source 64, this run 128)" in out.stderr
    assert not [e for e in read_metrics(run) if "loss" in e] and read_result(run)["status"] == "failed"


# ---------------------------------------------------------------------------------------------------------
# A run with init_from resumes from its own checkpoint, never from the source again


@pytest.fixture(scope="module")
def source_run(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("source") / "run"
    ok(run_trainer(run, data_dir, {"run.batch_size": 4, "run.steps": 4, "model.context_length": 64, **NO_SAMPLES}))
    return run


EXTEND = {**LONG_RUN, "run.steps": 6, "run.checkpoint_interval": 2, **NO_SAMPLES}


@pytest.mark.slow
def test_killed_run_resumes_from_its_own_checkpoint_bitwise(source_run, data_dir, tmp_path):
    sets = {**EXTEND, "run.init_from": str(source_run)}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    ok(run_trainer(straight, data_dir, sets))
    record = read_result(straight)["init_from"]
    final = sorted((source_run / "checkpoints").glob("step_*.pt"))[-1]
    assert record["sha256"] == hashlib.sha256(final.read_bytes()).hexdigest() and record["source_step"] == 4
    proc = start_trainer(killed, data_dir, sets)
    try:
        wait_for_step(killed, proc, 3)  # logged after the step-2 checkpoint
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.communicate()
    moved = source_run.with_name("moved")
    source_run.rename(moved)  # a relaunch must not need the source: it resumes from its own checkpoint
    try:
        ok(run_trainer(killed, data_dir, sets))
    finally:
        moved.rename(source_run)
    assert any(e.get("event") == "resume" for e in read_metrics(killed))
    assert train_losses(killed) == train_losses(straight)
    a, b = read_result(killed), read_result(straight)
    assert a["launches"] == 2 and a["test_loss"] == b["test_loss"] and a["init_from"] == b["init_from"]


# ---------------------------------------------------------------------------------------------------------
# The orchestrator: arms that start from arms, pinned paths, the wait in the queue, the launch


def experiment(**kw) -> Experiment:
    base = {**FAST, "data.path": "unused", **NO_SAMPLES}
    arms = [Intervention(name="long", init_from="baseline", set={"model.context_length": 32, "eval.test_tokens": 512})]
    return Experiment(name="ctx", preset="tiny", base=base, interventions=kw.pop("interventions", arms), **kw)


def test_an_arm_starts_from_the_same_seed_of_its_source_arm():
    runs = runspec.expand(experiment(seeds=2))
    by = {(r.arm, r.seed): r for r in runs}
    assert [r.arm for r in runs] == ["baseline", "baseline", "long", "long"]
    for seed in (42, 43):
        assert by[("long", seed)].config.run.init_from == by[("baseline", seed)].id
    other = runspec.expand(experiment(seeds=2), overrides={"optim.lr": 2e-3})
    assert {r.id for r in other}.isdisjoint(r.id for r in runs)  # another source: other ids all the way down
    alone = runspec.expand(experiment(include_baseline=False))
    assert [r.arm for r in alone] == ["long"] and alone[0].config.run.init_from == runs[0].id


@pytest.mark.parametrize(
    "interventions, words",
    [
        ([Intervention(name="a", init_from="nope")], "starts from 'nope', which is not 'baseline'"),
        ([Intervention(name="a", init_from="b"), Intervention(name="b", init_from="a")], "in a circle: a -> b -> a"),
        (
            [Intervention(name="a", init_from="baseline"), Intervention(name="b", stack=["a"])],
            "stacking carries `set` only",
        ),
    ],
)
def test_bad_arm_sources_are_refused(interventions, words):
    with pytest.raises(ValueError, match=words):
        experiment(interventions=interventions)


def test_arms_must_be_tested_on_the_same_tokens():
    exp = experiment(interventions=[Intervention(name="long", set={"model.context_length": 32})])
    with pytest.raises(SpecError, match=r"over 1,024 tokens \(32 × 32\), the baseline's over 512.*test_tokens=512"):
        runspec.expand(exp)
    shape = experiment(interventions=[Intervention(name="wide", init_from="baseline", set={"model.n_embd": 128})])
    with pytest.raises(SpecError, match=r"model.n_embd \(source 64, this run 128\)"):
        runspec.expand(shape)


def test_a_path_source_is_pinned_by_its_content(tmp_path):
    path = save_source(tmp_path / "src", tiny(**FAST))
    exp = experiment(interventions=[Intervention(name="from-dir", set={"run.init_from": str(tmp_path / "src")})])
    (run,) = [r for r in runspec.expand(exp) if r.arm == "from-dir"]
    assert run.config.run.init_from == str(path.resolve())
    assert run.config.run.init_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_bytes(path.read_bytes() + b"\0")  # the same name, other weights: another run
    (again,) = [r for r in runspec.expand(exp) if r.arm == "from-dir"]
    assert again.id != run.id


def test_context_extension_experiment_file():
    exp = specs.load_experiment(Path(__file__).parent.parent / "experiments" / "context_extension.py")
    runs = {r.arm: r for r in runspec.expand(exp)}
    stacked = {r.arm: r for r in runspec.expand(specs.load_experiment("experiments/stacked.py"))}
    assert runs["baseline"].id == stacked["stacked"].id  # the two files share the baseline's runs
    assert runs["extend-3072"].config.run.init_from == runs["baseline"].id
    long = runs["ctx-3072"].config
    assert long.total_steps() == 11_162 and long.test_windows() * 3072 == 3200 * 6 * 1024


def test_a_run_waits_in_the_queue_until_its_source_succeeds(db_url, tmp_path):
    engine = connect(db_url, create=True)
    exp = experiment(seeds=2)
    runs = runspec.expand(exp)
    submission.submit(engine, exp, runs)
    base = {r.seed: r.id for r in runs if r.arm == "baseline"}
    long = {r.seed: r.id for r in runs if r.arm == "long"}
    assert queries.claimable(engine) == 2  # the two baselines; the long runs wait
    assert sorted(r.id for r in queue.claim(engine, "w", limit=4)) == sorted(base.values())
    assert queries.claimable(engine) == 0 and queue.claim(engine, "w", limit=4) == []
    queue.finish(engine, base[42], "w", "succeeded", result={"status": "succeeded", "test_loss": 3.0, "step": 12})
    queue.finish(engine, base[43], "w", "failed", result={"status": "failed", "retryable": False})
    assert [r.id for r in queue.claim(engine, "w", limit=4)] == [long[42]]  # seed 43's source failed: it waits
    assert queries.counts(engine)["queued"] == 1 and queries.claimable(engine) == 0
    # orch status says why the queued run is not claimed, and how to let it go on
    from orchestrator import api
    from orchestrator.cli.runs import status_view

    now = api.status(db_url, pilots=False)
    [w] = now.waiting
    assert (w.run_id, w.source, w.source_state) == (long[43], base[43], "failed")
    assert w.fix == f"orch retry {base[43][:8]} (or orch cancel {long[43][:8]})"
    assert f"{long[43][:8]} waits for {base[43][:8]} (failed): orch retry" in render(status_view(now))
    for source, words in ((base[43], "is failed and would never be waited out: `orch retry"), ("f" * 16, "no run")):
        runs = runspec.expand(experiment(interventions=[]), overrides={"run.init_from": source})
        with pytest.raises(SpecError, match=words):
            dependencies.check_sources(runs, lambda: engine)
    # The launch: config.json's run.init_from is the source's directory, where this worker can see it.
    (run,) = queries.find(engine, long[42])
    config, why = dependencies.launch_config(engine, run, tmp_path / "runs")
    assert config["run"]["init_from"] == base[42] and why is not None and "not visible here" in why
    (tmp_path / "runs" / base[42]).mkdir(parents=True)
    (tmp_path / "runs" / base[42] / "config.json").write_text("{}")
    config, why = dependencies.launch_config(engine, run, tmp_path / "runs")
    assert why is None and config["run"]["init_from"] == str((tmp_path / "runs" / base[42]).resolve())


def render(renderable) -> str:
    from rich.console import Console

    console = Console(width=100, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(renderable)
    return console.export_text()


def write_file(path: Path, name: str, base: dict, interventions: str = "", include_baseline: bool = True) -> Path:
    path.write_text(
        "from orchestrator.specs import Experiment, Intervention\n"
        f"experiment = Experiment(name={name!r}, preset='tiny', base={base!r}, include_baseline={include_baseline},\n"
        f"    interventions=[{interventions}])\n"
    )
    return path


@pytest.mark.slow
def test_submit_by_run_id_waits_then_trains_from_the_source(tmp_path, data_dir):
    from tests.test_worker import Orch

    orch = Orch(tmp_path)
    base = {**FAST, "data.path": str(data_dir), "run.steps": 4, "run.checkpoint_interval": 0, **NO_SAMPLES}
    orch("submit", str(write_file(tmp_path / "src.py", "src", base)))
    (source,) = [m.run for m in queries.runs_of(connect(orch.db), ["src"])]
    sets = {"run.init_from": source.id, "model.context_length": 32, "eval.test_tokens": 512}
    dep_file = write_file(tmp_path / "dep.py", "dep", base, f"Intervention(name='long', set={sets!r})", False)
    orch("submit", str(dep_file))  # while the source is queued: it waits for it
    eng = connect(orch.db)
    (dep,) = [m.run for m in queries.runs_of(eng, ["dep"])]
    assert queries.claimable(eng) == 1  # the source only
    orch("worker", "--until-empty", "--heartbeat", "0.5")
    assert queries.counts(eng) == {"succeeded": 2}
    record = json.loads((orch.runs / dep.id / "init_from.json").read_text())
    final = sorted((orch.runs / source.id / "checkpoints").glob("step_*.pt"))[-1]
    assert record["checkpoint"] == str(final.resolve()) and record["source_step"] == 4
    assert record["sha256"] == hashlib.sha256(final.read_bytes()).hexdigest()
    written = json.loads((orch.runs / dep.id / "config.json").read_text())
    assert written["run"]["init_from"] == str((orch.runs / source.id).resolve())
    (stored,) = queries.find(eng, dep.id)
    assert stored.config["run"]["init_from"] == source.id and stored.result["init_from"]["sha256"] == record["sha256"]
