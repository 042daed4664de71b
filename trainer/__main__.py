"""`python -m trainer --config C --run-dir D` (or `--preset tiny`), alone or under torchrun."""

from __future__ import annotations

import argparse
import sys

from trainer import config
from trainer.config import ConfigError
from trainer.data import DataError


def parse_sets(items: list[str]) -> dict[str, object]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value (e.g. --set optim.lr=1e-3), got {item!r}")
        overrides[key.strip()] = config.parse_value(value)
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer",
        description="Train one GPT-2 run into a run directory (resumes from its newest checkpoint).",
        epilog="examples:\n  python -m trainer --preset tiny --run-dir runs/demo\n"
               "  torchrun --standalone --nproc_per_node 8 -m trainer --config runs/ID/config.json --run-dir runs/ID",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="a TrainConfig JSON file")
    source.add_argument("--preset", choices=sorted(config.PRESETS), help="a built-in config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set model.dropout=0 (repeatable)")
    parser.add_argument("--run-dir", required=True, help="where config, metrics, checkpoints and result go")
    args = parser.parse_args(argv)
    try:
        cfg = config.load(args.config, args.preset, parse_sets(args.set))
        from trainer.train import exit_code, train  # torch is imported only once the config is known good

        return exit_code(train(cfg, args.run_dir))
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
