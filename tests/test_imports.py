"""Imports never invent structure: every row is its own run and counts in n, only a seed the file gives pairs
runs, and importing a file again (even one imported by older code) adds nothing."""

from __future__ import annotations

import hashlib
import json

import pytest
from scipy import stats as sps

from orchestrator import api, stats, submission
from orchestrator.db import Run, connect
from orchestrator.specs import Experiment, Intervention

BASE = [3.70, 3.72, 3.74]
CLIP = [3.670, 3.685, 3.704]  # in file order: paired p ≈ 0.003, Welch p ≈ 0.09


def url(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/r.db"


def write(tmp_path, name: str, lines: list[str]) -> str:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def rows(tmp_path, experiment: str) -> dict:
    (board,) = api.table(experiment, db=url(tmp_path)).boards
    return {r.arm: r for r in board.rows}


def run_ids(tmp_path) -> list[str]:
    import sqlalchemy as sa

    with connect(url(tmp_path)).connect() as conn:
        return sorted(conn.execute(sa.select(Run.id)).scalars())


def old_id(experiment: str, arm: str, seed: int, loss: float) -> str:
    """The run id imports had before they kept repeats (and before seedless rows stopped pairing)."""
    return "imp" + hashlib.sha256(json.dumps([experiment, arm, seed, loss]).encode()).hexdigest()[:13]


def test_rows_without_seeds_are_independent_runs_compared_by_welch(tmp_path):
    lines = ["name,test_loss", *(f"baseline,{v}" for v in BASE), *(f"clip,{v}" for v in CLIP)]
    assert sps.ttest_rel(BASE, CLIP).pvalue < 0.01  # what pairing on file order would have claimed
    welch = sps.ttest_ind(BASE, CLIP, equal_var=False).pvalue
    assert 0.05 < welch < 0.2
    assert api.import_results(write(tmp_path, "pub.csv", lines), db=url(tmp_path)).count == 6
    clip = rows(tmp_path, "pub")["clip"]
    assert clip.n == 3 and clip.test == "welch"
    assert clip.p_value == pytest.approx(welch, rel=1e-12)
    assert clip.verdict != stats.BETTER


def test_rows_sharing_given_seeds_are_paired(tmp_path):
    lines = ["name,test_loss,seed", *(f"baseline,{v},{s}" for s, v in enumerate(BASE))]
    lines += [f"clip,{v},{s}" for s, v in reversed(list(enumerate(CLIP)))]  # row order does not matter
    assert api.import_results(write(tmp_path, "pub.csv", lines), db=url(tmp_path)).count == 6
    clip = rows(tmp_path, "pub")["clip"]
    assert clip.n == 3 and clip.test == "paired"
    assert clip.p_value == pytest.approx(sps.ttest_rel(BASE, CLIP).pvalue, rel=1e-12)


@pytest.mark.parametrize("seed", ["0", ""], ids=["same-seed", "no-seed"])
def test_identical_repeats_all_count(tmp_path, seed):
    """Seven byte-identical baselines (hardware nondeterminism measured nothing) are seven runs, not one."""
    lines = ["name,test_loss,seed", *[f"baseline,3.6915,{seed}"] * 7, f"clip,3.68,{seed}", f"clip,3.68,{seed}"]
    report = api.import_results(write(tmp_path, "blog.csv", lines), db=url(tmp_path))
    table = rows(tmp_path, "blog")
    assert report.count == 9 == len(run_ids(tmp_path))
    assert table["baseline"].n == 7 and table["clip"].n == 2
    assert report.count == sum(r.n for r in table.values())


def test_rows_with_one_name_and_seed_are_repeats(tmp_path):
    lines = ["name,test_loss,seed", "baseline,3.70,0", "baseline,3.72,0", "baseline,3.71,1", "baseline,3.70,0"]
    lines += ["clip,3.69,0", "clip,3.68,0", "clip,3.69,5"]
    report = api.import_results(write(tmp_path, "pub.csv", lines), db=url(tmp_path))
    table = rows(tmp_path, "pub")
    assert table["baseline"].n == 4 and table["clip"].n == 3
    assert report.count == 7 == sum(r.n for r in table.values()) == len(run_ids(tmp_path))
    assert sorted(table["baseline"].losses) == [3.70, 3.70, 3.71, 3.72]


def test_importing_a_file_again_adds_nothing(tmp_path):
    lines = ["name,test_loss,seed", "baseline,3.70,0", "baseline,3.70,0", "baseline,3.71,", "baseline,3.71,"]
    lines += ["clip,3.68,", "clip,3.69,1", "clip,3.69,1"]
    path = write(tmp_path, "pub.csv", lines)
    assert api.import_results(path, db=url(tmp_path)).count == 7
    first = run_ids(tmp_path)
    assert len(first) == 7
    assert api.import_results(path, db=url(tmp_path)).count == 7
    assert run_ids(tmp_path) == first
    table = rows(tmp_path, "pub")
    assert table["baseline"].n == 4 and table["clip"].n == 3


def test_ids_match_imports_by_older_code(tmp_path):
    """A given seed's first row and every seedless row (numbered within its arm, as before) keep the id that
    imports had before repeats were kept, so a file imported by older code is not stored twice."""
    lines = ["name,test_loss,seed", "baseline,3.70,0", "baseline,3.71,1", "clip,3.69,", "clip,3.68,"]
    api.import_results(write(tmp_path, "pub.csv", lines), db=url(tmp_path))
    expected = [
        old_id("pub", "baseline", 0, 3.70),
        old_id("pub", "baseline", 1, 3.71),
        old_id("pub", "clip", 0, 3.69),
        old_id("pub", "clip", 1, 3.68),
    ]
    assert run_ids(tmp_path) == sorted(expected)


def test_a_seedless_row_and_a_given_seed_with_one_loss_stay_two_runs(tmp_path):
    lines = ["name,test_loss,seed", "baseline,3.70,", "baseline,3.70,0", "clip,3.69,0"]
    path = write(tmp_path, "pub.csv", lines)
    assert api.import_results(path, db=url(tmp_path)).count == 3
    api.import_results(path, db=url(tmp_path))
    assert len(run_ids(tmp_path)) == 3
    assert rows(tmp_path, "pub")["baseline"].n == 2


def test_runs_imported_without_a_recorded_seed_pair_with_nothing(tmp_path):
    """Older imports stored no result["seed"] (their Run.seed may be a row index): such runs are unpaired."""
    engine = connect(url(tmp_path))
    spec = Experiment(name="old", interventions=[Intervention(name="clip")])
    runs = [
        submission.Imported(
            id=f"impold{arm}{seed}",
            arm=arm,
            seed=seed,
            test_loss=loss,
            result={"imported": True, "source": "old.csv", "name": arm, "test_loss": loss, "status": "succeeded"},
        )
        for arm, losses in (("baseline", BASE), ("clip", CLIP))
        for seed, loss in enumerate(losses)
    ]
    assert submission.add_imported(engine, spec, "old.csv", runs) == 6
    clip = rows(tmp_path, "old")["clip"]
    assert clip.n == 3 and clip.test == "welch"
    assert clip.p_value == pytest.approx(sps.ttest_ind(BASE, CLIP, equal_var=False).pvalue, rel=1e-12)
    assert clip.verdict != stats.BETTER
    # Imported again by this version, with the seeds the file gave: the stored runs learn them, and pair.
    for r in runs:
        r.result = {**r.result, "seed": r.seed}
    assert submission.add_imported(engine, spec, "old.csv", runs) == 0
    clip = rows(tmp_path, "old")["clip"]
    assert clip.n == 3 and clip.test == "paired"
    assert clip.p_value == pytest.approx(sps.ttest_rel(BASE, CLIP).pvalue, rel=1e-12)
