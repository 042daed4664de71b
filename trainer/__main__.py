"""`python -m trainer --config C --run-dir D` (or `--preset tiny`), alone or under torchrun."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from trainer import presets, runlock
from trainer.config import ConfigError
from trainer.data import DataError

# How long a launch by an orch worker (ORCH_LAUNCH_ID set) waits for a previous trainer of the same run to
# checkpoint and let go of the directory; by hand, a busy directory is an error at once.
LOCK_WAIT_S = float(os.environ.get("ORCH_LOCK_WAIT_S", "600"))


def parse_sets(items: list[str]) -> dict[str, object]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value (e.g. --set optim.lr=1e-3), got {item!r}")
        overrides[key.strip()] = presets.parse_value(value)
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
    source.add_argument("--preset", choices=sorted(presets.PRESETS), help="a built-in config")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set model.dropout=0 (repeatable)",
    )
    parser.add_argument("--run-dir", required=True, help="where config, metrics, checkpoints and result go")
    args = parser.parse_args(argv)
    runlock.die_with_parent()  # first: an orphan must never go on training (runlock.py)
    launch = os.environ.get("ORCH_LAUNCH_ID")
    lock = runlock.TrainerLock(args.run_dir, int(os.environ.get("RANK", "0")), launch)
    try:
        wait_s = LOCK_WAIT_S if launch else 0.0
        try:
            cfg = presets.load(args.config, args.preset, parse_sets(args.set))
        except ConfigError:
            # Even a config error's result is written by the holder only; but a mistyped --set by hand
            # creates no directory.
            if Path(args.run_dir).is_dir():
                lock.acquire(wait_s=wait_s)
            raise
        lock.acquire(wait_s=wait_s)  # before anything is written: one trainer per run directory
        from trainer.result import exit_code  # torch is imported only once the config is known good
        from trainer.train import train

        return exit_code(train(cfg, args.run_dir))
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if lock.fd is not None:  # only the holder may write the directory's result
            _record_failure(Path(args.run_dir), str(exc))
        return 2
    except runlock.RunDirBusy as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # One line instead of a traceback: the cause and the fix. Not the run's fault: the launcher retries
        # it (from the last complete checkpoint: every write is atomic) without counting an attempt.
        from trainer.rundir import EXIT_NO_SPACE, NO_SPACE_LINE

        print(
            f"{NO_SPACE_LINE} writing {exc.filename or args.run_dir}: free disk space under "
            f"{Path(args.run_dir).parent}; the run resumes from its last complete checkpoint",
            file=sys.stderr,
        )
        return EXIT_NO_SPACE
    finally:
        lock.release()


def _record_failure(run_dir: Path, message: str) -> None:
    """Tell the launcher this run cannot succeed as configured (so it is not retried)."""
    from trainer.rundir import EXIT_CODES, RESULT, Status, write_json

    if os.environ.get("RANK", "0") != "0" or not run_dir.is_dir():
        return
    write_json(
        run_dir / RESULT,
        {
            "status": Status.FAILED.value,
            "error": message,
            "retryable": False,
            "launch_id": os.environ.get("ORCH_LAUNCH_ID"),
            "exit_code": EXIT_CODES[Status.FAILED],
        },
    )


if __name__ == "__main__":
    code = main()
    # Everything the run leaves behind is written (atomically) by now; skipping the interpreter's
    # teardown of torch saves ~0.6 s of GPU-idle time per run between a worker's runs.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
