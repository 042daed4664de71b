"""`orch show` and `orch diff` on a study finished through the real queue (training simulated at the
database, as in tests/test_stats.py)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from orchestrator import api, queries, runspec, specs, submission
from orchestrator.cli import app
from orchestrator.db import connect
from tests.test_stats import simulate


@pytest.fixture
def db(tmp_path):
    url = f"sqlite:///{tmp_path / 'results.db'}"
    eng = connect(url)
    exp = specs.Experiment(
        name="pair",
        seeds=2,
        interventions=[specs.Intervention(name="clip", set={"optim.grad_clip": 1.0, "model.dropout": 0.0})],
    )
    submission.submit(eng, exp, runspec.expand(exp))
    simulate(eng, lambda run, arm: {"baseline": 3.70, "clip": 3.68}[arm])
    return url, {(m.arm, m.run.seed): m.run for m in queries.runs_of(eng, ["pair"])}


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_show_names_the_intervention_and_what_differs_from_the_paired_baseline(db):
    url, runs = db
    clip = next(r for (arm, _), r in runs.items() if arm == "clip")
    base = runs[("baseline", clip.seed)]
    view = api.show(clip.id[:6], db=url)
    [m] = view.memberships
    assert (m.experiment, m.arm) == ("pair", "clip")
    assert m.changes == {"optim.grad_clip": 1.0, "model.dropout": 0.0}
    assert m.baseline_run == base.id  # the same seed: the run a paired test pairs it with
    assert m.differs == {"model.dropout": [0.1, 0.0], "optim.grad_clip": [None, 1.0]}
    assert view.results["test loss"] == pytest.approx(clip.test_loss) and view.config["optim.grad_clip"] == 1.0
    out = invoke("show", clip.id[:6], "--db", url)
    assert out.exit_code == 0, out.output
    assert "in pair as clip: optim.grad_clip=1.0, model.dropout=0.0" in out.output
    assert (
        f"differs from baseline run {base.id} in: model.dropout: 0.1 -> 0.0; optim.grad_clip: None -> 1.0" in out.output
    )
    data = json.loads(invoke("show", clip.id, "--format", "json", "--db", url).output)
    assert data["id"] == clip.id and data["memberships"][0]["arm"] == "clip"


def test_diff_lists_the_keys_that_differ_and_the_results_side_by_side(db):
    url, runs = db
    a, b = runs[("baseline", 42)], next(r for (arm, s), r in runs.items() if arm == "clip" and s == 43)
    d = api.diff(a.id, b.id, db=url)
    assert d.differs == {"model.dropout": [0.1, 0.0], "optim.grad_clip": [None, 1.0], "run.seed": [42, 43]}
    assert d.results["test loss"] == [pytest.approx(a.test_loss), pytest.approx(b.test_loss)]
    out = invoke("diff", a.id[:8], b.id[:8], "--db", url)
    assert out.exit_code == 0, out.output
    assert "config: 3 key(s) differ" in out.output and "run.seed" in out.output
    assert json.loads(invoke("diff", a.id, b.id, "--format", "json", "--db", url).output)["a"] == a.id


@pytest.mark.parametrize(
    "args, says",
    [
        (["show", "x-y"], "is not a run id"),
        (["show", "abc123"], "no run id starts with"),
        (["show", "RUN", "--format", "xml"], "--format must be text or json"),
        (["diff", "RUN", "nope!"], "is not a run id"),
    ],
)
def test_bad_input_is_one_line_with_the_fix(db, args, says):
    url, runs = db
    some = next(iter(runs.values())).id
    out = invoke(*[some if a == "RUN" else a for a in args], "--db", url)
    assert out.exit_code == 2 and says in out.output


def test_ls_and_submit_print_json_too(db, tmp_path):
    url, runs = db
    listed = json.loads(invoke("ls", "pair", "--format", "json", "--db", url).output)
    assert {r["id"] for r in listed} == {r.id for r in runs.values()}
    assert {r["arm"] for r in listed} == {"baseline", "clip"} and all(r["state"] == "succeeded" for r in listed)
    exp = tmp_path / "more.py"
    exp.write_text(
        "from orchestrator.specs import Experiment, Intervention\n"
        "experiment = Experiment(name='pair', seeds=3, interventions=[Intervention(name='clip', "
        "set={'optim.grad_clip': 1.0, 'model.dropout': 0.0})])\n"
    )
    out = invoke("submit", str(exp), "--no-check-data", "--format", "json", "--db", url)
    assert out.exit_code == 0, out.output
    sub = json.loads(out.output)
    actions = sorted((r["action"], r["state"]) for r in sub["runs"])
    assert actions == [("queued", "queued")] * 2 + [("reused", "succeeded")] * 4
    bad = invoke("ls", "--format", "yaml", "--db", url)
    assert bad.exit_code == 2 and "--format must be text or json" in bad.output
