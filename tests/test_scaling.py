"""Scaling-law calculators: the blog series' published numbers, units in the output, JSON, emitted files, errors."""

from __future__ import annotations

import json
import math

import pytest

from orchestrator import runspec, scaling, specs
from trainer import presets

N_SERIES = 163_012_608  # the series' N: 20 · N = 3,260,252,160 tokens, its Cerebras D
D_SERIES = 3_260_252_160  # tokens
D_SERIES_SEQUENCES = 3_183_840  # = D_SERIES / 1024
TAU_SERIES = 0.22352  # τ_opt as the series printed it (see test_cerebras_tau)


def by_key(suggestions):
    return {s.key: s for s in suggestions}


def series(**overrides):
    kwargs = dict(params=N_SERIES, batch_sequences=96, lr=4e-4, context=1024, n_layer=12, d_model=768)
    return by_key(scaling.suggest(**{**kwargs, **overrides}))


# --- Chinchilla ----------------------------------------------------------------------------------------------


def test_chinchilla_budget_is_20_tokens_per_parameter():
    s = series()
    assert scaling.chinchilla_tokens(N_SERIES) == 20 * N_SERIES == D_SERIES
    assert s["chinchilla_tokens"].value == D_SERIES and s["chinchilla_tokens"].unit == "tokens"
    assert s["tpp"].value == 20 and "used as D" in s["chinchilla_tokens"].note


def test_given_tokens_replace_the_chinchilla_budget():
    s = series(tokens=1_000_000_000)
    assert s["chinchilla_tokens"].value == D_SERIES  # still shown, for comparison
    assert s["tpp"].value == pytest.approx(1e9 / N_SERIES)
    assert s["cerebras_batch_sequences"].inputs["D"] == {"value": 1_000_000_000, "unit": "tokens"}
    assert "given 1,000,000,000 tokens" in s["chinchilla_tokens"].note


# --- Cerebras Power Lines ------------------------------------------------------------------------------------


def test_cerebras_batch_reproduces_the_series():
    assert round(scaling.cerebras_batch_sequences(D_SERIES), 2) == 134.68
    b = series()["cerebras_batch_sequences"]
    assert round(b.value, 2) == 134.68 and b.unit == "sequences of 1024 tokens per step"
    assert b.inputs["D"]["unit"] == "tokens"


def test_cerebras_tau():
    # 1.084 · 20^−0.527 = 0.223556. The series printed 0.22352 (and computed its λ values from that printed
    # number, see below): 4e-5 (0.016%) lower than the formula it quoted, so the formula is checked to its own
    # value and the series' number to its size of slip.
    tau = scaling.cerebras_tau(20)
    assert round(tau, 5) == 0.22356
    assert math.isclose(tau, TAU_SERIES, rel_tol=2e-4)
    assert 1.084 * 20**0.527 > 1 > tau  # the exponent is negative: τ falls as tokens per parameter rise


def test_weight_decay_reproduces_the_series():
    # λ = B / (η · τ_opt · D), B and D in sequences, with the series' inputs.
    assert round(scaling.weight_decay(96, 4e-4, TAU_SERIES, D_SERIES_SEQUENCES), 5) == 0.33724
    assert round(scaling.weight_decay(96, 0.0014, TAU_SERIES, D_SERIES_SEQUENCES), 6) == 0.096355
    assert D_SERIES / 1024 == D_SERIES_SEQUENCES


def test_weight_decay_from_suggest_agrees_with_the_series_to_its_tau_slip():
    wd = series()["weight_decay"]
    assert wd.inputs["B"] == {"value": 96, "unit": "sequences of 1024 tokens per step"}
    assert wd.inputs["D"] == {"value": D_SERIES_SEQUENCES, "unit": "sequences of 1024 tokens"}
    assert wd.inputs["η"]["value"] == 4e-4 and wd.formula == "λ = B / (η · τ_opt · D)"
    assert f"{wd.value:.4g}" == "0.3372"  # 0.33719 with τ = 0.223556; the series' 0.33724 with τ = 0.22352
    assert f"{series(lr=0.0014)['weight_decay'].value:.3g}" == "0.0963"  # series: 0.096355
    assert wd.note == "B given; η given"


def test_weight_decay_defaults_to_cerebras_batch_and_deepseek_lr():
    s = by_key(scaling.suggest(N_SERIES, n_layer=12, d_model=768))
    wd = s["weight_decay"]
    assert wd.inputs["B"]["value"] == 135 and wd.inputs["η"]["value"] == s["lr"].value
    assert "B = Cerebras B_opt" in wd.note and "η = DeepSeek η_opt" in wd.note


# --- DeepSeek ------------------------------------------------------------------------------------------------


def test_deepseek_with_the_series_compute_reproduces_373_sequences_and_lr_0_0014():
    s = by_key(scaling.suggest(N_SERIES, flops=scaling.SERIES_DEEPSEEK_FLOPS))
    assert f"{scaling.SERIES_DEEPSEEK_FLOPS:.2g}" == "5e+18"
    assert round(s["deepseek_batch_sequences"].value) == 373
    assert s["deepseek_batch_tokens"].value == pytest.approx(373 * 1024)
    assert f"{s['lr'].value:.2g}" == "0.0014"
    assert "given directly" in s["flops"].note and "flops_per_token" not in s
    # the round 5.0e18 gives the same printed numbers
    assert round(scaling.deepseek_batch_tokens(5.0e18) / 1024) == 373
    assert f"{scaling.deepseek_lr(5.0e18):.2g}" == "0.0014"


def test_deepseek_from_the_gpt2_small_shape_is_not_the_series_compute():
    s = series()
    assert s["flops_per_token"].value == 72 * 12 * 768**2 + 6 * 12 * 768 * 1024 == 566_231_040
    assert s["flops"].value == pytest.approx(566_231_040 * D_SERIES) and f"{s['flops'].value:.3g}" == "1.85e+18"
    assert round(s["deepseek_batch_sequences"].value) == 269
    assert f"{s['lr'].value:.2g}" == "0.0016"
    assert "model shape" in s["flops"].note and s["flops_per_token"].source == scaling.DEEPSEEK_M


def test_deepseek_from_non_embedding_params_says_it_approximates():
    s = by_key(scaling.suggest(N_SERIES, non_embedding_params=85_000_000))
    assert s["flops_per_token"].value == 6 * 85_000_000 and s["flops_per_token"].formula == "M ≈ 6 · N_non-embedding"
    assert "approximate" in s["flops"].note and "n_layer and d_model" in s["flops"].note


# --- output ---------------------------------------------------------------------------------------------------


def test_every_suggestion_has_units_formula_inputs_and_source():
    for s in series().values():
        assert s.unit and s.formula and s.source and s.name
        assert all(set(q) == {"value", "unit"} and q["unit"] for q in s.inputs.values())
    s = series()
    assert s["deepseek_batch_tokens"].unit == "tokens per step" and "(tokens" in s["deepseek_batch_tokens"].name
    assert s["deepseek_batch_sequences"].unit == "sequences of 1024 tokens per step"
    assert "(sequences" in s["deepseek_batch_sequences"].name and s["flops"].unit == "FLOPs"


def test_render_text_shows_values_units_formulas_and_the_path_taken():
    text = scaling.render_text(scaling.suggest(N_SERIES, batch_sequences=96, lr=4e-4, flops=5e18, context=512))
    for fragment in [
        "134.68  sequences of 512 tokens per step",
        "3,260,252,160  tokens",
        "tokens per step",
        "λ = B / (η · τ_opt · D)",
        "B = 96 sequences of 512 tokens per step",
        "FLOPs",
        "given directly (flops)",
        "Bergsma et al. 2025",
        "Hoffmann et al. 2022",
        "DeepSeek-AI 2024",
    ]:
        assert fragment in text, fragment


def test_json_round_trips():
    suggestions = scaling.suggest(N_SERIES, batch_sequences=96, lr=4e-4, n_layer=12, d_model=768)
    text = scaling.to_json(suggestions)
    assert scaling.from_json(text) == suggestions
    items = json.loads(text)
    assert {"key", "name", "value", "unit", "formula", "inputs", "source", "note"} == set(items[0])
    assert {i["key"]: i["unit"] for i in items}["cerebras_batch_sequences"] == "sequences of 1024 tokens per step"


# --- emitted interventions and experiment files ---------------------------------------------------------------


def test_emit_intervention_is_python_for_an_intervention():
    s = scaling.suggest(N_SERIES, flops=scaling.SERIES_DEEPSEEK_FLOPS, batch_sequences=96)
    line = scaling.emit_intervention(s, name="deepseek-lr", digits=2)
    assert line == 'Intervention(name="deepseek-lr", set={"optim.lr": 0.0014, "optim.weight_decay": 0.094})'
    intervention = eval(line, {"Intervention": specs.Intervention})
    assert intervention.set == {"optim.lr": 0.0014, "optim.weight_decay": 0.094}
    assert scaling.emit_intervention(s, which=("weight_decay",)).startswith('Intervention(name="wd-0.094')


@pytest.mark.parametrize("preset", ["gpt2-small", "tiny"])
def test_emitted_experiment_file_loads_and_expands(tmp_path, preset):
    cfg = presets.load(preset_name=preset)
    s = scaling.suggest(**scaling.config_inputs(cfg))  # λ for the preset's own batch and lr
    text = scaling.emit_experiment_file(s, name="from-scaling", preset=preset, which=("weight_decay",))
    path = tmp_path / "suggested.py"
    path.write_text(text)
    exp = specs.load_experiment(path)
    assert exp.name == "from-scaling" and exp.preset == preset
    runs = runspec.expand(exp)
    arm = next(r for r in runs if r.arm != specs.BASELINE)
    assert arm.config.optim.weight_decay == float(f"{by_key(s)['weight_decay'].value:.5g}")
    assert {r.arm for r in runs} == {"baseline", exp.interventions[0].name}
    assert "λ = B / (η · τ_opt · D)" in text and "Bergsma et al. 2025" in text


def test_emitted_lr_and_weight_decay_file_loads_and_expands(tmp_path):
    s = scaling.suggest(N_SERIES, tokens=3_260_153_856, batch_sequences=96, n_layer=12, d_model=768)
    text = scaling.emit_experiment_file(s, which=("lr", "weight_decay"), intervention_name="deepseek-lr-cerebras-wd")
    (tmp_path / "e.py").write_text(text)
    [_, arm] = runspec.expand(specs.load_experiment(tmp_path / "e.py"))
    assert arm.arm == "deepseek-lr-cerebras-wd" and arm.config.optim.lr == float(f"{by_key(s)['lr'].value:.5g}")


def test_config_inputs_count_the_models_parameters():
    import torch  # noqa: F401  (the model is built only to check the count)

    from trainer.model import GPT

    assert scaling.config_inputs(presets.load(preset_name="gpt2-small"))["params"] == 163_009_536
    for overrides in ({}, {"model.tie_weights": True}, {"model.qkv_bias": True}):
        cfg = presets.load(preset_name="tiny", overrides=overrides)
        assert scaling.config_inputs(cfg)["params"] == GPT(cfg.model).num_params()
    inputs = scaling.config_inputs(presets.load(preset_name="gpt2-small"))
    assert inputs == {
        "params": 163_009_536,
        "tokens": 33_165 * 96 * 1024,  # the seed rounds the budget up to whole steps
        "batch_sequences": 96,
        "lr": 4e-4,
        "context": 1024,
        "n_layer": 12,
        "d_model": 768,
    }


# --- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(params=-5), "params must be a positive number.*e.g. 163009536"),
        (dict(params=0), "params must be a positive number"),
        (dict(tokens=0), "tokens must be a positive number.*leave it out for Chinchilla"),
        (dict(lr=0), "lr must be a positive number.*e.g. 4e-4"),
        (dict(lr=-1e-3), "lr must be a positive number"),
        (dict(batch_sequences=0), "batch_sequences must be a positive number.*e.g. 96"),
        (dict(flops=float("nan")), "flops must be a positive number.*C in FLOPs"),
        (dict(context=0), "context must be a positive number"),
        (dict(n_layer=12, d_model=None), "give both n_layer and d_model"),
        (dict(n_layer=None, d_model=None), "give n_layer and d_model .* or flops"),
    ],
)
def test_bad_input_says_how_to_fix_it(kwargs, match):
    with pytest.raises(ValueError, match=match):
        scaling.suggest(**{**dict(params=N_SERIES, n_layer=12, d_model=768), **kwargs})


def test_emitting_a_weight_decay_for_another_lr_or_batch_is_refused(tmp_path):
    s = scaling.suggest(N_SERIES, batch_sequences=96, lr=4e-4, n_layer=12, d_model=768)
    with pytest.raises(ValueError, match="λ = 0.33719 was computed for η = 0.0004"):
        scaling.emit_intervention(s, which=("lr", "weight_decay"))  # the lr is DeepSeek's, λ assumed 4e-4
    with pytest.raises(ValueError, match="computed for B = 96"):
        scaling.emit_intervention(s, which=("cerebras_batch_sequences", "weight_decay"))
    with pytest.raises(ValueError, match="preset tiny .* has B = 16"):
        scaling.emit_experiment_file(s, preset="tiny", which=("weight_decay",))
    with pytest.raises(ValueError, match="two suggestions set run.batch_size"):
        scaling.emit_intervention(s, which=("cerebras_batch_sequences", "deepseek_batch_sequences"))
    with pytest.raises(ValueError, match="'tau' is not a config setting"):
        scaling.emit_intervention(s, which=("tau",))
    with pytest.raises(ValueError, match="may use only letters"):
        scaling.emit_experiment_file(s, name="has space", which=("weight_decay",))
    with pytest.raises(ValueError, match="unknown preset"):
        scaling.emit_experiment_file(s, preset="nope", which=("weight_decay",))


def test_cli_suggest_prints_formulas_and_emits_a_loadable_file(tmp_path):
    import subprocess
    import sys

    from orchestrator import runspec, specs
    from tests.conftest import subprocess_env

    out_file = tmp_path / "suggested.py"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "suggest",
            "--preset",
            "gpt2-small",
            "--lr",
            "0.0004",
            "--emit",
            str(out_file),
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    # D = 33,165 steps × 96 sequences (the seed's budget rounded up to whole steps): λ = 0.33719, the series' 0.3372
    assert "λ = B / (η · τ_opt · D)" in out.stdout and "0.33719" in out.stdout and "sequences" in out.stdout
    runs = runspec.expand(specs.load_experiment(out_file))
    assert {r.arm for r in runs} >= {"baseline"} and len({r.arm for r in runs}) == 2
    bad = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "suggest"], env=subprocess_env(), capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--params" in bad.stderr
