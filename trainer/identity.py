"""What makes two configs the same run.

A run's identity (its run id, the checks that a relaunch or a resume is of the same run) is its resolved
config, less two things: sections that change nothing a run trains or measures (NOT_IDENTITY), and keys added
after run ids were first handed out, at the value that means "as before" (LATER_KEYS). Both rules live here,
in one place, so that adding a switch or a sampling option never moves a stored run's id nor refuses a
checkpoint written before it existed. TrainConfig.identity() is a config seen this way; same_run compares a
stored config (config.json, a checkpoint's) with it.
"""

from __future__ import annotations

import json
from typing import Any

from trainer.config import DEFAULT_PROMPT, MoEConfig, TrainConfig

# Keys added after run ids were first handed out, each with the value that means "as before". A config that
# holds that value identifies a run as if the key did not exist, so a new switch changes no stored run's id
# and a checkpoint written before the key existed still resumes (tests/test_config.py pins both).
LATER_KEYS: dict[str, Any] = {
    "model.pad_vocab": 1,
    "model.position": "learned",
    "model.rope_base": 10000.0,
    "model.norm": "layernorm",
    "model.mlp": "gelu",
    "model.bias": True,
    "model.qk_norm": False,
    "model.logit_softcap": None,
    "model.moe": MoEConfig().model_dump(mode="json"),  # the whole section: dense (see without_later_keys)
    "sample.prompts": [DEFAULT_PROMPT],
    "sample.tokens": 40,
    "sample.temperature": 1.0,
    "sample.top_k": None,
    "sample.count": 2,
    "sample.seed": 0,
    "data.dataset": None,
    "data.start_train_token": 0,
    "data.start_val_token": 0,
    "schedule.convention": "orch",
    "eval.test_tokens": None,
    "run.init_from": None,
    "run.init_positions": "interpolate",
    "run.init_sha256": None,
}


# Sections that change nothing a run trains or measures, so not what a run is: another prompt in `sample` must
# not retrain every run of an experiment (3B tokens each at gpt2-small), nor refuse a relaunch. A run's
# samples.json follows the config it was launched with; `orch sample` gives any other prompt from its weights.
NOT_IDENTITY = ("sample",)


def without_later_keys(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict (a model_dump, or one stored by an older orch) minus NOT_IDENTITY, minus LATER_KEYS at
    their neutral value, and minus a section that this leaves empty (one made only of later keys: a config
    stored before such a section existed has no such section at all)."""
    data = _test_slice_as_windows(json.loads(json.dumps(data)))  # a deep copy
    for section in NOT_IDENTITY:
        data.pop(section, None)
    for dotted, neutral in LATER_KEYS.items():
        *parents, leaf = dotted.split(".")
        chain = [data]  # the dicts from the top down to the key's section
        for part in parents:
            chain.append(chain[-1].get(part) if isinstance(chain[-1], dict) else None)
        node = chain[-1]
        if isinstance(node, dict) and leaf in node and _is_neutral(node[leaf], neutral):
            del node[leaf]
            for parent, part, child in reversed(list(zip(chain, parents, chain[1:]))):
                if child:
                    break
                del parent[part]
    return data


def _test_slice_as_windows(data: dict[str, Any]) -> dict[str, Any]:
    """eval.test_tokens as the eval.test_sequences it amounts to: a run's identity is the slice it is tested
    on, however it was written (19,660,800 tokens at 1,024 is the 19,200 sequences of the gpt2-small preset)."""
    evals, T = data.get("eval"), (data.get("model") or {}).get("context_length")
    if isinstance(evals, dict) and isinstance(evals.get("test_tokens"), int) and isinstance(T, int):
        if evals["test_tokens"] % T == 0:
            evals["test_sequences"] = evals.pop("test_tokens") // T
    return data


def _is_neutral(value: Any, neutral: Any) -> bool:
    """A later key's value means "as before". For a whole later section (model.moe) that is every key it holds
    at its neutral value: a section stored before one of its keys existed lacks that key."""
    if isinstance(neutral, dict):
        return isinstance(value, dict) and all(k in neutral and v == neutral[k] for k, v in value.items())
    return value == neutral


def same_run(stored: dict[str, Any], cfg: TrainConfig) -> bool:
    """Whether a stored config (config.json, a checkpoint's) describes the same run as `cfg`."""
    return isinstance(stored, dict) and without_later_keys(stored) == cfg.identity()
