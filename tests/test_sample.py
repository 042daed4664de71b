"""Samples: the `sample` config section (old configs keep their run ids), generation (greedy = the argmax of the
model's own forward, top-k, seeds, cropping, padded vocabularies, switches), samples.json at the end of a real
run that changes no training number, `orch sample` reproducing it and refusing bad input in one line, and the
samples in MLflow (a real SQLite store) and `orch report`."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch
from typer.testing import CliRunner

from conftest import ok, read_result, trainer_cmd
from orchestrator import queries, report, runspec, specs, submission
from orchestrator.cli import app
from trainer import checkpoint, config, identity, presets
from trainer.config import ConfigError, ModelConfig
from trainer.model import GPT
from trainer.rundir import SAMPLES, read_metrics
from trainer.sample import (
    GREEDY,
    SAMPLED,
    Sample,
    SampleError,
    Samples,
    complete,
    encode,
    generate,
    markdown,
    read_samples,
    write_run_samples,
)
from trainer.tokenizer import EOT, gpt2

PROMPT = config.DEFAULT_PROMPT
STEPS = 4  # of the real runs: conftest's FAST tiny config, cut short (process start-up dominates anyway)


def small_model(**model) -> GPT:
    """A one-layer GPT over GPT-2's vocabulary with a 16-token context, gpt2-initialised, in train mode."""
    torch.manual_seed(0)
    cfg = ModelConfig(context_length=16, n_embd=32, n_layer=1, n_head=2, dropout=0.1, init="gpt2", **model)
    return GPT(cfg)


# ---------------------------------------------------------------------------------------------------------
# The config section


def test_a_config_stored_before_the_sample_section_keeps_its_run_id_and_resumes():
    import hashlib

    from orchestrator.runspec import run_id

    cfg = presets.load(preset_name="tiny")
    assert cfg.sample.prompts == [PROMPT] and "sample" not in cfg.identity()  # not part of what a run is
    # The presets' ids as orch handed them out before the section existed (commit 58b3531).
    assert run_id(cfg, 0) == "d0a7d796c05fcd99"
    assert run_id(presets.load(preset_name="gpt2-small"), 0) == "d4e6cd87edbb9e37"
    old = cfg.model_dump(mode="json")
    del old["sample"]  # a config.json or checkpoint written before the section existed
    old = identity.without_later_keys(old)  # ... and before the other later keys
    canonical = json.dumps({"config": old, "repeat": 0}, sort_keys=True)
    assert run_id(cfg, 0) == hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert identity.same_run(old, cfg)
    for key, neutral in identity.LATER_KEYS.items():
        if key.startswith("sample."):
            assert getattr(cfg.sample, key.removeprefix("sample.")) == neutral, key
    # Samples change no trained or measured number: another prompt is the same run (identity.NOT_IDENTITY), so
    # it retrains nothing and a relaunch with it resumes.
    for key, value in {"sample.prompts": ["Hello"], "sample.count": 0, "sample.temperature": 0.7}.items():
        changed = presets.load(preset_name="tiny", overrides={key: value})
        assert "sample" not in changed.identity() and getattr(changed.sample, key.removeprefix("sample.")) == value
        assert run_id(changed, 0) == run_id(cfg, 0) and identity.same_run(old, changed), key


@pytest.mark.parametrize(
    "key, value, says",
    [
        ("sample.prompts", [""], "sample.prompts.0"),
        ("sample.temperature", 0, "sample.temperature"),
        ("sample.tokens", 0, "sample.tokens"),
        ("sample.count", -1, "sample.count"),
        ("sample.top_k", 0, "sample.top_k"),
        ("sample.promts", [], "did you mean 'prompts'"),
    ],
)
def test_bad_sample_settings_name_the_key(key, value, says):
    with pytest.raises(ConfigError, match=says.replace(".", r"\.")):
        presets.load(preset_name="tiny", overrides={key: value})


# ---------------------------------------------------------------------------------------------------------
# Generation


@pytest.mark.parametrize(
    "model",
    [
        {},
        {"pad_vocab": 64},
        {"position": "rope", "logit_softcap": 15.0, "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": True},
    ],
    ids=["gpt2", "pad_vocab", "modern"],
)
def test_greedy_is_the_argmax_of_the_models_own_forward_cropped_to_its_context(model):
    net = small_model(**model).eval()
    prompt = encode("Every effort moves you, " * 4, net.cfg.vocab_size)
    assert len(prompt) > net.cfg.context_length  # the prompt alone overflows the context: cropped from the left
    new, ended = generate(net, prompt, 6)
    idx = list(prompt)
    with torch.no_grad():
        for token in new:
            want = int(net(torch.tensor([idx[-net.cfg.context_length :]]))[0, -1].argmax())
            assert token == want
            idx.append(token)
    assert ended == "length" and len(new) == 6


def test_sampling_repeats_per_seed_and_leaves_the_global_rng_and_train_mode_alone():
    net = small_model()  # train mode, dropout 0.1: a draw from the global RNG would show
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = complete(net, PROMPT, 12, temperature=1.0, seed=3)
    b = complete(net, PROMPT, 12, temperature=1.0, seed=3)
    c = complete(net, PROMPT, 12, temperature=1.0, seed=4)
    assert torch.equal(torch.get_rng_state(), before) and net.training
    assert a == b and a.tokens != c.tokens
    assert (a.kind, a.seed, a.temperature, a.top_k) == (SAMPLED, 3, 1.0, None)
    assert a.text == gpt2().decode(a.tokens)
    greedy = complete(net, PROMPT, 12)
    assert (greedy.kind, greedy.seed, greedy.temperature) == (GREEDY, None, 0.0)
    assert complete(net, PROMPT, 12, temperature=1.0, top_k=1, seed=9).tokens == greedy.tokens


def test_top_k_draws_only_among_the_k_likeliest_tokens():
    net = small_model().eval()
    s = complete(net, PROMPT, 10, temperature=5.0, top_k=3, seed=0)  # hot: without top-k, anything goes
    idx = encode(PROMPT, net.cfg.vocab_size)
    with torch.no_grad():
        for token in s.tokens:
            top = net(torch.tensor([idx[-16:]]))[0, -1].topk(3).indices.tolist()
            assert token in top
            idx.append(token)


def test_rows_past_the_vocabulary_are_never_sampled():
    """model.pad_vocab's rows (the forward drops their logits) and real rows past GPT-2's 50,257 tokens (which
    the tokenizer could not decode) are never chosen, even when their logits would win every draw."""
    for model in ({"pad_vocab": 64}, {"vocab_size": 50304}):
        net = small_model(**model).eval()
        with torch.no_grad():  # ln_f's outputs sum to n_embd (zero-mean LayerNorm + bias 1): logits of 3,200
            net.ln_f.bias.fill_(1.0)
            net.head.weight[50257:] = 100.0
        drawn = complete(net, PROMPT, 30, temperature=2.0, seed=1).tokens + complete(net, PROMPT, 5).tokens
        assert drawn and max(drawn) < 50257, model
        if "vocab_size" in model:  # the rows are real logits here: the restriction, not the model, keeps them out
            with torch.no_grad():
                assert int(net(torch.tensor([encode(PROMPT, 50304)]))[0, -1].argmax()) >= 50257


def test_a_completion_ends_at_endoftext():
    net = small_model().eval()
    with torch.no_grad():  # ln_f outputs its bias (all ones) whatever comes in; only EOT's head row reads it
        net.ln_f.weight.zero_()
        net.ln_f.bias.fill_(1.0)
        net.head.weight.zero_()
        net.head.weight[EOT] = 1.0
    s = complete(net, PROMPT, 10)
    assert (s.tokens, s.text, s.ended) == ([], "", "eot")


def test_a_model_that_cannot_take_gpt2_tokens_is_refused_and_its_run_still_ends(tmp_path):
    net = small_model(vocab_size=1000).eval()
    with pytest.raises(SampleError, match="vocab_size is 1000"):
        complete(net, PROMPT, 5)
    with pytest.raises(SampleError, match="empty"):
        encode("", 50257)
    cfg = presets.load(preset_name="tiny", overrides={"model.vocab_size": 1000})
    done = write_run_samples(tmp_path, net, cfg, step=7)
    assert done.samples == [] and "vocab_size is 1000" in done.note
    assert read_samples(tmp_path) == done


def test_samples_in_between_training_steps_change_no_loss():
    """Dropout draws from the global RNG on every training step: samples taken between steps (sampled ones,
    with their own generator) must leave every later loss as it was."""

    def losses(sample_after: int | None) -> list[float]:
        net = small_model()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        data = torch.randint(0, 50257, (6, 4, 17), generator=torch.Generator().manual_seed(0))
        out = []
        for step, batch in enumerate(data):
            loss = torch.nn.functional.cross_entropy(net(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
            if step == sample_after:
                complete(net, PROMPT, 8, temperature=1.0, seed=0)
                complete(net, PROMPT, 8)
        return out

    assert losses(sample_after=2) == losses(sample_after=None)


def test_markdown_shows_each_prompt_and_escapes_markup():
    s = Samples(
        step=5,
        device="cpu",
        amp="fp32",
        seconds=0.1,
        samples=[
            Sample("Hi *", GREEDY, 0.0, None, None, " there\nyou_", [1], "length"),
            Sample("Hi *", SAMPLED, 0.8, 50, 2, " <b>", [2], "eot"),
        ],
    )
    text = markdown(s)
    assert text.count("## Hi \\*") == 1
    assert "*greedy*: **Hi \\*** there ⏎ you\\_" in text
    assert "*T=0.8, top-k 50, seed 2*: **Hi \\*** \\<b\\> ⟨endoftext⟩" in text


# ---------------------------------------------------------------------------------------------------------
# A real run: samples.json, and no training number changed by it


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir) -> dict[str, Path]:
    """The same short tiny run twice, side by side: with the default samples, and with none."""
    tmp = tmp_path_factory.mktemp("sample-runs")
    dirs = {"with": tmp / "with", "without": tmp / "without"}
    sets = {"with": {}, "without": {"sample.prompts": []}}
    from conftest import subprocess_env

    procs = {
        k: subprocess.Popen(
            trainer_cmd(d, data_dir, {"run.steps": STEPS, "model.dropout": 0.1, **sets[k]}),
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k, d in dirs.items()
    }
    for k, p in procs.items():
        out, err = p.communicate(timeout=300)
        ok(subprocess.CompletedProcess(p.args, p.returncode, out, err))
        assert read_result(dirs[k])["status"] == "succeeded"
    return dirs


def test_a_run_writes_its_samples_and_they_change_no_training_number(runs):
    done = read_samples(runs["with"])
    cfg = presets.load(str(runs["with"] / "config.json"))
    assert [(s.prompt, s.kind, s.seed) for s in done.samples] == [
        (PROMPT, GREEDY, None),
        (PROMPT, SAMPLED, 0),
        (PROMPT, SAMPLED, 1),
    ]
    assert done.step == STEPS and done.note is None and (done.device, done.amp) == ("cpu", "fp32")
    for s in done.samples:  # 40 tokens through a 16-token context, or fewer where <|endoftext|> came first
        assert s.text == gpt2().decode(s.tokens) and (len(s.tokens) == cfg.sample.tokens) == (s.ended == "length")
    # samples.json is written before result.json, whose presence says the launch is over.
    assert (runs["with"] / SAMPLES).stat().st_mtime_ns <= (runs["with"] / "result.json").stat().st_mtime_ns
    without = read_samples(runs["without"])
    assert without.samples == [] and without.note == "sample.prompts is empty"

    def numbers(events):
        keys = ("step", "loss", "grad_norm", "lr", "val_loss", "test_loss")
        return [{k: e[k] for k in keys if k in e} for e in events if "event" not in e]

    assert numbers(read_metrics(runs["with"])) == numbers(read_metrics(runs["without"]))
    a, b = (checkpoint.load(checkpoint.latest(d)) for d in (runs["with"], runs["without"]))
    assert a["step"] == b["step"] == STEPS
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # The final checkpoint's torch RNG: the one a continuation would draw dropout from. (Python's and NumPy's
    # generators are in a checkpoint too, but the trainer neither seeds nor uses them: they differ per process.)
    assert [r["torch"].tolist() for r in a["rng"]] == [r["torch"].tolist() for r in b["rng"]]


def invoke(*args: str):
    return CliRunner().invoke(app, ["sample", *args])


def test_orch_sample_repeats_the_runs_samples_from_its_final_checkpoint(runs):
    done = read_samples(runs["with"])
    greedy = invoke(str(runs["with"]), "--prompt", PROMPT, "--format", "json")
    assert greedy.exit_code == 0, greedy.output
    out = json.loads(greedy.output)
    assert out["step"] == STEPS and out["checkpoint"].endswith(f"step_{STEPS:08d}.pt")
    assert out["samples"] == [asdict(done.samples[0])]
    sampled = invoke(str(runs["with"]), "--prompt", PROMPT, "--temperature", "1", "--count", "2", "--format", "json")
    assert json.loads(sampled.output)["samples"] == [asdict(s) for s in done.samples[1:]]
    second = invoke(str(runs["with"]), "--prompt", PROMPT, "--temperature", "1", "--seed", "1", "--format", "json")
    assert json.loads(second.output)["samples"] == [asdict(done.samples[2])]  # the i-th alone: seed S + i
    text = invoke(str(checkpoint.latest(runs["with"])), "--prompt", PROMPT, "--tokens", "5")
    assert text.exit_code == 0 and f"(step {STEPS})" in text.output
    assert f"[greedy] {PROMPT}{gpt2().decode(done.samples[0].tokens[:5])}" in text.output


def one_line_error(out, fragment: str) -> None:
    assert out.exit_code == 2, out.output
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out.output, out.output
    assert fragment in lines[0], lines[0]


def test_orch_sample_refuses_bad_input_in_one_line(runs, tracked, tmp_path):
    run = str(runs["with"])
    root, _, _, planned = tracked
    db = ["--db", f"sqlite:///{root / 'results.db'}"]  # its runs' directories hold no checkpoint
    one_line_error(invoke("ab12", "--prompt", PROMPT, *db), "no run id starts with 'ab12' (see `orch ls`)")
    one_line_error(
        invoke(planned[0].id[:8], "--prompt", PROMPT, *db), f"run {planned[0].id} (succeeded) has no checkpoint yet"
    )
    one_line_error(invoke(str(tmp_path / "nowhere!"), "--prompt", PROMPT), "neither a run id")
    (tmp_path / "fresh").mkdir()
    one_line_error(invoke(str(tmp_path / "fresh"), "--prompt", PROMPT), "has no checkpoint yet")
    one_line_error(invoke(run, "--prompt", PROMPT, "--tokens", "-3"), "--tokens must be at least 1, not -3")
    one_line_error(invoke(run, "--prompt", ""), "--prompt is empty")
    one_line_error(invoke(run, "--prompt", PROMPT, "--count", "3"), "give --temperature")
    one_line_error(invoke(run, "--prompt", PROMPT, "--temperature", "-1"), "--temperature must be 0")
    one_line_error(invoke(run, "--prompt", PROMPT, "--temperature", "1", "--top-k", "0"), "--top-k must be at least")
    one_line_error(invoke(run, "--prompt", PROMPT, "--format", "yaml"), "--format must be text or json")
    one_line_error(invoke(run), "Missing option '--prompt'")


# ---------------------------------------------------------------------------------------------------------
# MLflow and orch report


@pytest.fixture(scope="module")
def tracked(runs, tmp_path_factory):
    """A baseline and an intervention, one seed each, finished with the real run's files (the intervention's
    greedy completion rewritten, so the arms differ), sent to a SQLite MLflow store by the outbox."""
    from orchestrator.db import Run, connect
    from orchestrator.outbox import Outbox
    from orchestrator.tracking import Tracker

    root = tmp_path_factory.mktemp("sample-tracked")
    engine = connect(f"sqlite:///{root / 'results.db'}")
    exp = specs.Experiment(
        name="smoke", seeds=1, interventions=[specs.Intervention(name="no-dropout", set={"model.dropout": 0.0})]
    )
    planned = runspec.expand(exp)
    submission.submit(engine, exp, planned)
    for r in planned:
        d = root / "runs" / r.id
        shutil.copytree(runs["with"], d, ignore=shutil.ignore_patterns("checkpoints", "*.lock"))
        if r.arm != specs.BASELINE:
            data = json.loads((d / SAMPLES).read_text())
            data["samples"][0]["text"] = " and the <dropout> is gone"
            (d / SAMPLES).write_text(json.dumps(data))
        result = read_result(d)
        with engine.begin() as conn:
            values = dict(state="succeeded", launches=1, run_dir=str(d), result=result, test_loss=result["test_loss"])
            conn.execute(sa.update(Run).where(Run.id == r.id).values(**values, finished_at=time.time()))
    tracker = Tracker(f"sqlite:///{root / 'mlflow.db'}")
    outbox = Outbox(engine, tracker, "test", runs_dir=root / "runs")
    for r in planned:
        assert outbox.sync(r.id).done
    return root, engine, tracker, planned


def test_mlflow_shows_each_runs_samples(tracked, runs):
    from orchestrator.tracking import SAMPLE_TAG

    root, engine, tracker, planned = tracked
    done = read_samples(runs["with"])
    [row] = queries.runs(engine, [planned[0].id])  # the baseline
    files = {a.path for a in tracker.client.list_artifacts(row.mlflow_run_id)}
    assert {"samples.json", "samples.md", "result.json", "config.json"} <= files
    md = Path(tracker.client.download_artifacts(row.mlflow_run_id, "samples.md", str(root))).read_text()
    assert md == markdown(done, "Samples of this run") and f"## {PROMPT}" in md
    tags = tracker.client.get_run(row.mlflow_run_id).data.tags
    assert tags[SAMPLE_TAG] == PROMPT + done.samples[0].text


def test_the_report_shows_each_arms_greedy_completion(tracked, runs):
    import html

    root, engine, _, planned = tracked
    page = report.write_report(engine, "smoke", root / "report", runs_dir=root / "runs").read_text(encoding="utf-8")
    section = page[page.index("<h2>Samples</h2>") :]
    greedy = read_samples(runs["with"]).samples[0].text
    seed = {r.arm: r.seed for r in planned}
    for arm, text in (("baseline", greedy), ("no-dropout", " and the <dropout> is gone")):
        assert f"<td>{arm}</td><td>{seed[arm]}</td><td>{STEPS}</td>" in section
        assert f"<b>{PROMPT}</b>{html.escape(text)}</td>" in section
    assert "<dropout>" not in section  # escaped
