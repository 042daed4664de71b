"""TrainConfig: the presets, the switches of the blog's runs, and bad configs failing with the promised message."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import PYTHON, REPO, subprocess_env
from trainer import presets
from trainer.config import ConfigError

# ---------------------------------------------------------------------------------------------------------
# Presets


def test_gpt2_small_preset_is_the_blog_baseline():
    cfg = presets.load(preset_name="gpt2-small")
    m, o, s, p, e, r = cfg.model, cfg.optim, cfg.schedule, cfg.precision, cfg.eval, cfg.run
    assert (m.vocab_size, m.context_length, m.n_embd, m.n_layer, m.n_head) == (50257, 1024, 768, 12, 12)
    assert m.dropout == 0.1
    assert m.dropout_embed is m.dropout_attn is m.dropout_resid is None  # one rate everywhere
    assert m.qkv_bias is False and m.tie_weights is False
    assert m.init == "pytorch"
    assert cfg.data.order == "sequential"
    assert r.batch_size == 96
    assert r.micro_batch_size in ("auto", 12)
    assert r.tokens == 3_260_190_720 and r.steps is None
    # Rounded up to whole steps, as the seed repo's load_dataset does: 33,165 × 98,304 = 3,260,252,160 tokens.
    assert cfg.total_steps() == 33165 and cfg.total_steps() * 96 * 1024 == 3_260_252_160
    assert o.lr == 4e-4 and o.weight_decay == 0.1
    assert o.decay_biases and o.decay_norms and o.decay_embeddings  # decay on every parameter
    assert o.grad_clip is None
    assert s.kind == "constant" and s.warmup == 0 and s.warmup_steps is None
    assert p.amp == "fp16" and p.tf32 is True
    assert r.seed == 42
    assert e.test_sequences == 19200 == 3200 * 6


def test_tiny_preset_is_small_and_runs_a_fixed_number_of_steps():
    cfg = presets.load(preset_name="tiny")
    m = cfg.model
    assert (m.vocab_size, m.n_embd, m.n_layer, m.context_length) == (50257, 64, 2, 64)
    assert m.n_embd % m.n_head == 0
    assert cfg.run.tokens is None and cfg.total_steps() == cfg.run.steps
    assert cfg.precision.amp == "fp32"


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match=r"unknown preset 'huge'.*gpt2-small.*tiny"):
        presets.load(preset_name="huge")


def test_exactly_one_of_file_and_preset(tmp_path):
    with pytest.raises(ConfigError, match="exactly one"):
        presets.load()
    path = tmp_path / "c.json"
    path.write_text("{}")
    with pytest.raises(ConfigError, match="exactly one"):
        presets.load(str(path), "tiny")


def test_resolved_config_round_trips_through_a_json_file(tmp_path):
    cfg = presets.load(preset_name="tiny", overrides={"optim.lr": 3e-3, "model.qkv_bias": True})
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json())
    again = presets.load(str(path))
    assert again == cfg
    assert again.to_json() == cfg.to_json()


def test_tokens_budget_sets_the_step_count_rounded_up_to_whole_steps():
    # The seed repo's rule (ddp_train.py, load_dataset): the fewest whole steps that reach the budget.
    step = 16 * 64  # tokens per step of the tiny preset
    for tokens, steps in ((step * 7, 7), (step * 7 + 5, 8), (step * 8 - 1, 8), (100, 1), (1, 1)):
        cfg = presets.load(preset_name="tiny", overrides={"run.steps": None, "run.tokens": tokens})
        assert cfg.total_steps() == steps, tokens


# ---------------------------------------------------------------------------------------------------------
# Every switch of the blog series' published runs exists and takes effect.


@pytest.mark.parametrize(
    "key, value",
    [
        ("model.dropout", 0.0),
        ("model.qkv_bias", True),
        ("model.tie_weights", True),
        ("optim.grad_clip", 3.5),
        ("optim.weight_decay", 0.01),
        ("optim.lr", 1.4e-3),
        ("schedule.kind", "cosine"),
        ("schedule.warmup", 0.05),
        ("schedule.min_lr_ratio", 0.1),
        ("precision.amp", "fp32"),
        ("precision.amp", "fp16"),
        ("precision.amp", "bf16"),
        ("run.micro_batch_size", 6),
        ("run.tokens", 1_000_000_000),
    ],
)
def test_blog_switch_exists(key, value):
    cfg = presets.load(preset_name="gpt2-small", overrides={key: value})
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == value


def test_blog_stacked_run_validates():
    """The series' best run: clipping 3.5 + no dropout + 5% warmup, cosine to 10% of 1.4e-3 + wd 0.01."""
    cfg = presets.load(
        preset_name="gpt2-small",
        overrides={
            "optim.grad_clip": 3.5,
            "model.dropout": 0.0,
            "schedule.kind": "cosine",
            "schedule.warmup": 0.05,
            "schedule.min_lr_ratio": 0.1,
            "optim.lr": 1.4e-3,
            "optim.weight_decay": 0.01,
        },
    )
    assert cfg.total_steps() == 33165
    from trainer.optim import lr_at, warmup_steps

    assert warmup_steps(cfg.schedule, 33165) == round(0.05 * 33165)
    assert lr_at(33164, 33165, cfg.optim.lr, cfg.schedule) == pytest.approx(1.4e-4)


# ---------------------------------------------------------------------------------------------------------
# Bad configs: via overrides


def test_unknown_override_key_names_it_and_suggests_the_close_match():
    with pytest.raises(ConfigError) as info:
        presets.load(preset_name="tiny", overrides={"model.dropot": 0})
    msg = str(info.value)
    assert "model.dropot" in msg
    assert "did you mean 'dropout'" in msg


def test_unknown_section_suggests_the_close_match():
    with pytest.raises(ConfigError, match=r"'optimm\.lr'.*did you mean 'optim'"):
        presets.load(preset_name="tiny", overrides={"optimm.lr": 1e-3})


def test_wrong_type_names_the_key_and_the_value():
    with pytest.raises(ConfigError) as info:
        presets.load(preset_name="tiny", overrides={"model.n_layer": "two"})
    msg = str(info.value)
    assert "model.n_layer" in msg and "integer" in msg and "'two'" in msg


def test_wrong_literal_lists_the_choices():
    with pytest.raises(ConfigError) as info:
        presets.load(preset_name="tiny", overrides={"schedule.kind": "cosin"})
    msg = str(info.value)
    assert "schedule.kind" in msg and "'cosine'" in msg and "'cosin'" in msg


def test_heads_not_dividing_width_names_both_and_a_fix():
    with pytest.raises(ConfigError) as info:
        presets.load(preset_name="tiny", overrides={"model.n_embd": 66, "model.n_head": 4})
    msg = str(info.value)
    assert "model.n_embd (66)" in msg and "model.n_head (4)" in msg
    assert "try n_embd=" in msg
    fix = int(msg.split("try n_embd=")[1].split()[0].rstrip(";,)"))
    assert fix % 4 == 0  # the suggested fix is itself valid
    assert presets.load(preset_name="tiny", overrides={"model.n_embd": fix, "model.n_head": 4}).model.n_embd == fix


def test_negative_lr_is_refused():
    with pytest.raises(ConfigError) as info:
        presets.load(preset_name="tiny", overrides={"optim.lr": -1e-3})
    msg = str(info.value)
    assert "optim.lr" in msg and "greater than 0" in msg and "-0.001" in msg


def test_both_tokens_and_steps_is_refused():
    with pytest.raises(ConfigError, match=r"exactly one of run.tokens and run.steps"):
        presets.load(preset_name="tiny", overrides={"run.tokens": 100_000, "run.steps": 10})
    with pytest.raises(ConfigError, match=r"exactly one of run.tokens and run.steps"):
        presets.load(preset_name="gpt2-small", overrides={"run.tokens": None})  # neither


def test_setting_one_budget_clears_the_other():
    """`--set run.steps=40` works on a preset budgeted in tokens, and the other way round."""
    cfg = presets.load(preset_name="gpt2-small", overrides={"run.steps": 40})
    assert cfg.run.tokens is None and cfg.total_steps() == 40
    cfg = presets.load(preset_name="tiny", overrides={"run.tokens": 16 * 64 * 9})
    assert cfg.run.steps is None and cfg.total_steps() == 9


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("model.dropout", 1.0, "model.dropout"),
        ("run.micro_batch_size", 0, "run.micro_batch_size"),
        ("run.micro_batch_size", "big", "run.micro_batch_size"),
        ("schedule.warmup", 1.5, "schedule.warmup"),
        ("eval.amp", "fp8", "eval.amp"),
    ],
)
def test_impossible_values_name_the_key(key, value, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        presets.load(preset_name="tiny", overrides={key: value})


def test_wsd_decay_and_warmup_must_fit():
    with pytest.raises(ConfigError, match=r"schedule.warmup .* schedule.decay"):
        presets.load(
            preset_name="tiny", overrides={"schedule.kind": "wsd", "schedule.warmup": 0.9, "schedule.decay": 0.2}
        )


# ---------------------------------------------------------------------------------------------------------
# Bad configs: via a JSON file


def _write(tmp_path, obj) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return str(path)


def test_file_unknown_key_names_it_and_suggests_the_close_match(tmp_path):
    path = _write(tmp_path, {"model": {"dropot": 0.0}})
    with pytest.raises(ConfigError) as info:
        presets.load(path)
    msg = str(info.value)
    assert path in msg
    assert "model.dropot" in msg and "did you mean 'dropout'" in msg


def test_file_unknown_section_suggests_the_close_match(tmp_path):
    with pytest.raises(ConfigError, match=r"optimizer.*did you mean 'optim'"):
        presets.load(_write(tmp_path, {"optimizer": {"lr": 1e-3}}))


def test_file_wrong_type(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lr.*number.*'fast'"):
        presets.load(_write(tmp_path, {"optim": {"lr": "fast"}}))


def test_file_impossible_values(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.n_embd \(100\).*model\.n_head \(12\).*try n_embd=96"):
        presets.load(_write(tmp_path, {"model": {"n_embd": 100}}))
    with pytest.raises(ConfigError, match=r"optim\.lr.*greater than 0"):
        presets.load(_write(tmp_path, {"optim": {"lr": -1}}))
    with pytest.raises(ConfigError, match=r"exactly one of run.tokens and run.steps"):
        presets.load(_write(tmp_path, {"run": {"steps": 10}}))  # the default run.tokens is still set


def test_file_overrides_apply_on_top(tmp_path):
    path = _write(tmp_path, {"run": {"steps": 10, "tokens": None}})
    cfg = presets.load(path, overrides={"optim.lr": 2e-3})
    assert cfg.run.steps == 10 and cfg.optim.lr == 2e-3


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        presets.load(str(tmp_path / "nope.json"))
    with pytest.raises(ConfigError, match="not valid JSON"):
        presets.load(_write(tmp_path, "{not json"))


# ---------------------------------------------------------------------------------------------------------
# The command line: a user's error is one line, exit code 2, no traceback.


def _cli(*args, timeout=60):
    return subprocess.run(
        [PYTHON, "-m", "trainer", *args],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_unknown_key_is_one_line_error(tmp_path):
    run_dir = tmp_path / "X"
    proc = _cli("--preset", "tiny", "--set", "model.dropot=0", "--run-dir", str(run_dir))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:")
    assert "model.dropot" in lines[0] and "dropout" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()


def test_cli_set_without_equals_is_an_error(tmp_path):
    proc = _cli("--preset", "tiny", "--set", "model.dropout", "--run-dir", str(tmp_path / "X"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "key=value" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_invalid_value_is_an_error_without_traceback(tmp_path):
    proc = _cli("--preset", "tiny", "--set", "model.n_head=5", "--run-dir", str(tmp_path / "X"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "model.n_head (5)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_missing_data_names_the_prepare_command(tmp_path):
    missing = tmp_path / "no-data"
    proc = _cli("--preset", "tiny", "--set", f"data.path={missing}", "--run-dir", str(tmp_path / "X"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and str(missing) in proc.stderr
    assert "python -m trainer.prepare" in proc.stderr
    assert "Traceback" not in proc.stderr
