"""Token shards on disk, read by memmap.

A dataset directory (written by `python -m trainer.prepare`) holds meta.json plus shards named
`{split}_{index:06d}.bin` for the splits train, val and test. A shard is llm.c's format, so llm.c /
modded-nanogpt FineWeb shards work as they are: a header of 256 int32 (magic 20240520, version 1, token
count), then the tokens as uint16.

A split is one long token stream (its shards concatenated). Sequence i of a split is the window
tokens[i·T : i·T + T + 1]: T inputs and, shifted by one, T targets; consecutive windows share one token.

Training order: step s uses the run's global batch of G sequences at positions [s·G, (s+1)·G) of the order;
rank r takes positions s·G + r·(G/world) … and splits them into micro-batches. So the sequences a step sees
depend only on (step, G), never on the world size, and the data position a checkpoint needs is the step.
"sequential" is the stream in order (the blog series); "shuffled" is a permutation drawn from data.seed,
redrawn per epoch, so the data order is a seed of its own, separate from initialisation.

A run reads a split through open_split: data.start_train_token / data.start_val_token tokens of the train /
val split are skipped first (the seed repo's train.json keys), so window i starts at token skip + i·T; the
test slice always starts at token 0. data.dataset, where set, must be the dataset the directory's meta.json
names, or the run refuses the directory.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where tensors are made: `orch submit` checks data without it
    import torch

    from trainer.config import DataConfig

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
SPLITS = ("train", "val", "test")


class DataError(RuntimeError):
    """Missing or damaged data, with the command that (re)creates it."""


def prepare_hint(directory: Path) -> str:
    """The command that made this directory (from meta.json), or the one for the embedded corpus."""
    try:
        return json.loads((directory / "meta.json").read_text())["command"]
    except (OSError, ValueError, KeyError):
        return f"python -m trainer.prepare embedded --out {directory}"


def held_dataset(directory: Path) -> str | None:
    """The dataset a prepared directory holds, as its meta.json names it: "dataset", or for a directory
    prepared before that key existed, its "source" (embedded, files, fineweb); None without a meta.json."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return (meta.get("dataset") or meta.get("source")) if isinstance(meta, dict) else None


def check_dataset_name(directory: str | Path, wanted: str | None) -> None:
    """Refuse a directory that does not hold the dataset data.dataset names (None: any directory will do)."""
    if wanted is None:
        return
    held = held_dataset(Path(directory))
    if held != wanted:
        says = f"holds {held!r} (its meta.json)" if held else "names no dataset (no readable meta.json)"
        raise DataError(
            f"data.dataset is {wanted!r} but {directory} {says}: point data.path at a directory prepared "
            f"from {wanted!r}, or set data.dataset to what it holds (null: whatever data.path holds)"
        )


def _listed_shards(directory: Path, split: str) -> int | None:
    try:
        return int(json.loads((directory / "meta.json").read_text())["shards"][split])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """Write one shard atomically (tmp + rename)."""
    if tokens.size and int(tokens.max()) >= 2**16:
        raise ValueError("token ids must fit in uint16")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = (MAGIC, VERSION, tokens.size)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16, copy=False).tobytes())
    tmp.replace(path)


def shard_length(path: Path) -> int:
    """A shard's token count, after checking its header against its size (reads 1 KiB, never the tokens)."""
    hint = prepare_hint(path.parent)
    try:
        size = path.stat().st_size
        header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    except OSError as exc:
        raise DataError(f"cannot read shard {path} ({exc.strerror}); prepare it with `{hint}`") from None
    if header.size < HEADER_INTS or header[0] != MAGIC:
        raise DataError(f"{path} is not a token shard (bad magic number); re-create it with `{hint}`")
    if header[1] != VERSION:
        raise DataError(
            f"{path} has shard version {header[1]}, this trainer reads {VERSION}; re-create it with `{hint}`"
        )
    n = int(header[2])
    if n < 0 or size != HEADER_BYTES + 2 * n:
        raise DataError(
            f"{path} is truncated or corrupt: header says {n} tokens ({HEADER_BYTES + 2 * n} bytes), "
            f"file has {size} bytes; re-create it with `{hint}`"
        )
    return n


def read_shard(path: Path) -> np.memmap:
    """Memmap a shard's tokens after checking its header against its size."""
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(shard_length(path),))


def shard_paths(directory: str | Path, split: str) -> list[Path]:
    """The shards of one split in order, or DataError naming what is missing and the command that makes it."""
    directory = Path(directory)
    hint = prepare_hint(directory)
    if not directory.is_dir():
        what = "is a file, not a directory" if directory.exists() else "does not exist"
        raise DataError(f"data directory {directory} {what}; prepare it with `{hint}`")
    if not (directory / "meta.json").exists() and not list(directory.glob("*.bin")):
        raise DataError(f"{directory} holds no prepared data (no meta.json); prepare it with `{hint}`")
    paths = sorted(directory.glob(f"{split}_*.bin"))
    listed = _listed_shards(directory, split)
    if listed is not None:  # meta.json says how many shards there are: a missing one is an error
        missing = [f"{split}_{i:06d}.bin" for i in range(listed) if not (directory / f"{split}_{i:06d}.bin").exists()]
        if missing:
            raise DataError(
                f"{directory / missing[0]} is missing ({len(missing)} of {listed} {split!r} shards); "
                f"re-create the data with `{hint}`"
            )
        paths = [directory / f"{split}_{i:06d}.bin" for i in range(listed)]
    if not paths:
        raise DataError(f"{directory} has no {split!r} shards ({split}_000000.bin …); prepare it with `{hint}`")
    return paths


def check_dataset(
    directory: str | Path,
    seq_len: int | None = None,
    val_sequences: int = 0,
    test_sequences: int = 0,
    *,
    dataset: str | None = None,
    start_train_token: int = 0,
    start_val_token: int = 0,
) -> dict[str, int]:
    """Check a dataset directory the way training will read it, from the shards' headers only: every split
    present, every shard's magic, version and token count consistent with its size, the dataset the config
    names; given seq_len, the train split holds a sequence and the val / test splits hold the fixed evaluation
    slices, each after its skipped tokens. Returns tokens per split (all of them, skipped ones included). This
    is what `orch submit` runs before queuing, so bad data is found before any launch."""
    tokens = {split: sum(shard_length(p) for p in shard_paths(directory, split)) for split in SPLITS}
    check_dataset_name(directory, dataset)
    skips = {"train": start_train_token, "val": start_val_token, "test": 0}
    for split, skip in skips.items():
        _check_skip(directory, split, skip, tokens[split])
    if seq_len is not None:
        if (tokens["train"] - skips["train"] - 1) // seq_len < 1:
            raise DataError(
                f"{directory}: the train split has {tokens['train'] - skips['train']} tokens to read, fewer than "
                f"one sequence of {seq_len + 1}; prepare more data with `{prepare_hint(Path(directory))}`"
            )
        for split, n, what in (
            ("val", val_sequences, "eval.val_sequences"),
            ("test", test_sequences, "eval.test_sequences (or eval.test_tokens)"),
        ):
            have = max(0, (tokens[split] - skips[split] - 1) // seq_len)
            if have < n:
                raise DataError(
                    f"{directory}: the {split} split holds {have} sequences of {seq_len} tokens, but {what} "
                    f"asks for {n}; lower {what} or prepare more data (a larger --{split}-fraction or more input)"
                )
    return tokens


def _check_skip(directory: str | Path, split: str, skip: int, n_tokens: int) -> None:
    if not 0 <= skip <= n_tokens:
        raise DataError(
            f"data.start_{split}_token ({skip:,}) is past the end of the {split} split of {directory} "
            f"({n_tokens:,} tokens); lower it"
        )


class Split:
    """One split's shards as a single token stream, less its first `skip` tokens (data.start_*_token)."""

    def __init__(self, directory: str | Path, split: str, skip: int = 0):
        paths = shard_paths(directory, split)
        self.name = split
        self.shards = [read_shard(p) for p in paths]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        _check_skip(directory, split, skip, int(self.starts[-1]))
        self.skip = skip
        self.n_tokens = int(self.starts[-1]) - skip  # the tokens this stream holds, after the skipped ones

    def tokens(self, start: int, length: int) -> np.ndarray:
        """tokens[start : start + length] of the stream (after the skipped tokens) across shards, as int64."""
        if start < 0 or start + length > self.n_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside split {self.name} of {self.n_tokens}")
        start += self.skip
        out, pos = [], start
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while pos < start + length:
            offset = pos - self.starts[shard]
            take = min(start + length - pos, len(self.shards[shard]) - offset)
            out.append(self.shards[shard][offset : offset + take])
            pos += take
            shard += 1
        return np.concatenate(out).astype(np.int64)

    def n_sequences(self, seq_len: int) -> int:
        return max(0, (self.n_tokens - 1) // seq_len)

    def sequences(self, indices, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, each (len(indices), seq_len) int64, for the given window indices."""
        import torch

        rows = np.stack([self.tokens(int(i) * seq_len, seq_len + 1) for i in indices])
        x = torch.from_numpy(rows[:, :-1].copy())
        y = torch.from_numpy(rows[:, 1:].copy())
        return x, y


def open_split(data: DataConfig, split: str, directory: str | Path | None = None) -> Split:
    """A split as a run reads it: data.dataset checked against the directory's meta.json, and the train / val
    split's first data.start_train_token / data.start_val_token tokens skipped (the test slice never is).
    `directory` overrides data.path (`python -m trainer.evaluate --data`)."""
    directory = data.path if directory is None else directory
    check_dataset_name(directory, data.dataset)
    skip = {"train": data.start_train_token, "val": data.start_val_token}.get(split, 0)
    return Split(directory, split, skip)


class TrainOrder:
    """Which window of the train split sits at each global position, for sequential or shuffled order."""

    def __init__(self, split: Split, seq_len: int, order: str, seed: int):
        self.split, self.seq_len, self.order, self.seed = split, seq_len, order, seed
        self.n = split.n_sequences(seq_len)
        if self.n == 0:
            raise DataError(f"train split has {split.n_tokens} tokens, fewer than one sequence of {seq_len + 1}")

    # One TrainOrder per run, alive as long as the trainer: caching on the method holds nothing longer.
    @functools.lru_cache(maxsize=2)  # noqa: B019
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def window(self, position: int) -> int:
        epoch, j = divmod(position, self.n)
        return j if self.order == "sequential" else int(self._permutation(epoch)[j])

    def micro_batch(self, step: int, global_batch: int, rank: int, world: int, micro: int, index: int):
        """Rank `rank`'s micro-batch number `index` (of size `micro`) of optimizer step `step`."""
        first = step * global_batch + rank * (global_batch // world) + index * micro
        return self.split.sequences([self.window(p) for p in range(first, first + micro)], self.seq_len)

    def epochs(self, steps: int, global_batch: int) -> float:
        return steps * global_batch / self.n


def fixed_slice(split: Split, seq_len: int, n_sequences: int, what: str) -> int:
    """Check that a split holds the fixed evaluation slice (its first n windows) and return n."""
    have = split.n_sequences(seq_len)
    if have < n_sequences:
        raise DataError(
            f"the {split.name} split holds {have} sequences of {seq_len} tokens, but {what} asks for {n_sequences}; "
            f"lower {what} or prepare more data (a larger --{split.name}-fraction or more input)"
        )
    return n_sequences
