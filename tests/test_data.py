"""Token shards, data order across ranks, corpus preparation from local files, and the offline tokenizer."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import PYTHON, REPO, subprocess_env, synthetic_documents
from trainer.data import HEADER_BYTES, MAGIC, DataError, Split, TrainOrder, fixed_slice, read_shard, write_shard
from trainer.prepare import file_corpus, prepare, split_of
from trainer.tokenizer import EOT, gpt2

# ---------------------------------------------------------------------------------------------------------
# Shards


def test_shard_round_trip(tmp_path):
    tokens = np.array([0, 1, 2, 50256, 65535, 17, 42], dtype=np.uint16)
    path = tmp_path / "train_000000.bin"
    write_shard(path, tokens)
    assert path.stat().st_size == HEADER_BYTES + 2 * tokens.size
    header = np.fromfile(path, dtype=np.int32, count=3)
    assert list(header) == [MAGIC, 1, tokens.size]
    back = read_shard(path)
    assert back.dtype == np.uint16
    assert np.array_equal(back, tokens)
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed away


def test_shard_round_trip_from_int64(tmp_path):
    tokens = np.arange(1000, dtype=np.int64) * 50
    write_shard(tmp_path / "x.bin", tokens)
    assert np.array_equal(read_shard(tmp_path / "x.bin").astype(np.int64), tokens)


def test_token_ids_must_fit_uint16(tmp_path):
    with pytest.raises(ValueError, match="uint16"):
        write_shard(tmp_path / "x.bin", np.array([70000]))


@pytest.fixture
def data_copy(data_dir, tmp_path) -> Path:
    """A private copy of the session dataset that a test may damage."""
    out = tmp_path / "data"
    shutil.copytree(data_dir, out)
    return out


def _hint(directory: Path) -> str:
    return json.loads((directory / "meta.json").read_text())["command"]


def test_truncated_shard_names_the_file_and_the_prepare_command(data_copy):
    path = data_copy / "val_000000.bin"
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(DataError) as info:
        Split(data_copy, "val")
    msg = str(info.value)
    assert str(path) in msg and "truncated or corrupt" in msg
    assert _hint(data_copy) in msg


def test_corrupt_header_names_the_file_and_the_prepare_command(data_copy):
    path = data_copy / "test_000000.bin"
    data = bytearray(path.read_bytes())
    data[0:4] = b"\x00\x01\x02\x03"
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as info:
        Split(data_copy, "test")
    msg = str(info.value)
    assert str(path) in msg and "magic" in msg and _hint(data_copy) in msg


def test_wrong_version_names_the_file(data_copy):
    path = data_copy / "test_000000.bin"
    data = bytearray(path.read_bytes())
    data[4:8] = np.array([7], dtype=np.int32).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"version 7.*re-create it with"):
        read_shard(path)


def test_shard_shorter_than_its_header(data_copy):
    path = data_copy / "val_000000.bin"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError) as info:
        Split(data_copy, "val")
    assert str(path) in str(info.value) and _hint(data_copy) in str(info.value)


def test_missing_shard_file_names_it(data_copy):
    path = data_copy / "train_000099.bin"
    with pytest.raises(DataError) as info:
        read_shard(path)
    assert str(path) in str(info.value) and _hint(data_copy) in str(info.value)


def test_missing_split_names_it_and_the_prepare_command(data_copy):
    for p in data_copy.glob("val_*.bin"):
        p.unlink()
    with pytest.raises(DataError) as info:
        Split(data_copy, "val")
    msg = str(info.value)
    assert "'val'" in msg and "val_000000.bin" in msg and _hint(data_copy) in msg


def test_missing_one_of_several_shards_is_an_error(data_copy):
    """meta.json says how many shards each split has; losing one must not silently shorten the stream."""
    meta = json.loads((data_copy / "meta.json").read_text())
    assert meta["shards"]["train"] >= 2, meta  # the fixture writes 20K-token shards
    missing = data_copy / "train_000000.bin"
    missing.unlink()
    with pytest.raises(DataError) as info:
        Split(data_copy, "train")
    assert "train_000000.bin" in str(info.value)


def test_missing_directory_and_unprepared_directory(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*python -m trainer.prepare"):
        Split(tmp_path / "nowhere", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no prepared data.*python -m trainer.prepare embedded --out"):
        Split(tmp_path / "empty", "train")


def test_split_reads_across_shard_boundaries(data_dir):
    split = Split(data_dir, "train")
    assert len(split.shards) >= 2
    first = len(split.shards[0])
    joined = np.concatenate([np.asarray(s) for s in split.shards]).astype(np.int64)
    assert split.n_tokens == joined.size
    assert np.array_equal(split.tokens(first - 5, 10), joined[first - 5 : first + 5])
    x, y = split.sequences([0, 3], 16)
    assert x.shape == y.shape == (2, 16) and x.dtype == torch.int64
    assert torch.equal(x[1], torch.from_numpy(joined[48:64]))
    assert torch.equal(y[1], torch.from_numpy(joined[49:65]))  # targets are inputs shifted by one
    with pytest.raises(IndexError):
        split.tokens(split.n_tokens - 3, 10)


def test_fixed_slice_too_big_says_how_to_fix(data_dir):
    val = Split(data_dir, "val")
    have = val.n_sequences(64)
    assert fixed_slice(val, 64, have, "eval.val_sequences") == have
    with pytest.raises(DataError, match=r"eval.val_sequences.*--val-fraction"):
        fixed_slice(val, 64, have + 1, "eval.val_sequences")


# ---------------------------------------------------------------------------------------------------------
# Training order


@pytest.mark.parametrize("order", ["sequential", "shuffled"])
def test_ranks_read_disjoint_parts_of_the_single_process_batch(data_dir, order):
    split = Split(data_dir, "train")
    T, G = 16, 8
    one = TrainOrder(split, T, order, seed=3)
    two = TrainOrder(split, T, order, seed=3)
    for step in (0, 1, 7):
        x1, y1 = one.micro_batch(step, G, rank=0, world=1, micro=G, index=0)
        parts = [two.micro_batch(step, G, rank=r, world=2, micro=2, index=i) for r in range(2) for i in range(2)]
        assert torch.equal(torch.cat([p[0] for p in parts]), x1)
        assert torch.equal(torch.cat([p[1] for p in parts]), y1)
        r0 = torch.cat([p[0] for p in parts[:2]])
        r1 = torch.cat([p[0] for p in parts[2:]])
        rows0 = {tuple(r.tolist()) for r in r0}
        assert not rows0 & {tuple(r.tolist()) for r in r1}  # the ranks' sequences are disjoint
    # Consecutive steps do not overlap either.
    a = {tuple(r.tolist()) for r in one.micro_batch(0, G, 0, 1, G, 0)[0]}
    b = {tuple(r.tolist()) for r in one.micro_batch(1, G, 0, 1, G, 0)[0]}
    assert not a & b


def test_sequential_order_is_the_stream(data_dir):
    split = Split(data_dir, "train")
    order = TrainOrder(split, 16, "sequential", seed=0)
    x, _ = order.micro_batch(2, 8, 0, 1, 8, 0)
    assert torch.equal(x[0], torch.from_numpy(split.tokens(16 * 16, 16)))
    assert [order.window(p) for p in range(5)] == [0, 1, 2, 3, 4]
    assert order.window(order.n + 2) == 2  # the next epoch starts over


def test_shuffled_order_is_a_seeded_permutation(data_dir):
    split = Split(data_dir, "train")
    a = TrainOrder(split, 16, "shuffled", seed=0)
    n = a.n
    perm = [a.window(p) for p in range(n)]
    assert sorted(perm) == list(range(n))  # every window exactly once per epoch
    assert perm != list(range(n))
    again = [TrainOrder(split, 16, "shuffled", seed=0).window(p) for p in range(n)]
    assert again == perm  # a function of the seed
    other = [TrainOrder(split, 16, "shuffled", seed=1).window(p) for p in range(n)]
    assert other != perm and sorted(other) == list(range(n))
    second_epoch = [a.window(n + p) for p in range(n)]
    assert sorted(second_epoch) == list(range(n)) and second_epoch != perm


def test_train_split_too_short_for_one_sequence(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    write_shard(d / "train_000000.bin", np.arange(10))
    with pytest.raises(DataError, match="fewer than one sequence"):
        TrainOrder(Split(d, "train"), 16, "sequential", 0)


# ---------------------------------------------------------------------------------------------------------
# Preparation from local files


def _read_split_docs(directory: Path, split: str) -> list[str]:
    """The documents of one split, decoded from its shards (each starts with <|endoftext|>)."""
    paths = sorted(directory.glob(f"{split}_*.bin"))
    if not paths:
        return []
    tokens = np.concatenate([np.asarray(read_shard(p)) for p in paths]).astype(np.int64).tolist()
    docs, cur = [], None
    for t in tokens:
        if t == EOT:
            if cur is not None:
                docs.append(cur)
            cur = []
        else:
            cur.append(t)
    docs.append(cur)
    enc = gpt2()
    return [enc.decode(d) for d in docs]


def _write_inputs(folder: Path, docs: list[str]) -> list[Path]:
    """The documents spread over a .txt file per document, a .jsonl file and a .parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    third = len(docs) // 3
    txt = folder / "txt"
    txt.mkdir()
    for i, d in enumerate(docs[:third]):
        (txt / f"doc{i:03d}.txt").write_text(d, encoding="utf-8")
    jsonl = folder / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[third : 2 * third])))
    parquet = folder / "docs.parquet"
    pq.write_table(
        pa.table({"text": docs[2 * third :], "n": list(range(len(docs) - 2 * third))}), parquet, row_group_size=7
    )
    return [txt, jsonl, parquet]


def _check_prepared(out: Path, docs: list[str], val: float, test: float) -> dict:
    meta = json.loads((out / "meta.json").read_text())
    enc = gpt2()
    assert meta["documents"] == len(docs)
    assert sum(meta["tokens"].values()) == sum(len(enc.encode_ordinary(d)) + 1 for d in docs)
    for split in ("train", "val", "test"):
        want = sorted(d for d in docs if split_of(d, val, test) == split)
        assert sorted(_read_split_docs(out, split)) == want, split
        assert want, f"no {split} documents: the test corpus is too small"
    return meta


def test_prepare_files_cli(tmp_path):
    docs = synthetic_documents(n_docs=60, seed=7) + ["Ünïcödé — “quoted” text ✓."]
    inputs = _write_inputs(tmp_path / "in", docs)
    out = tmp_path / "out"
    cmd = [
        PYTHON,
        "-m",
        "trainer.prepare",
        "files",
        *map(str, inputs),
        "--out",
        str(out),
        "--val-fraction",
        "0.2",
        "--test-fraction",
        "0.2",
        "--shard-tokens",
        "1000",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    meta = _check_prepared(out, docs, 0.2, 0.2)
    assert meta["source"] == "files" and meta["tokenizer"] == "gpt2"
    assert meta["command"].startswith("python -m trainer.prepare files")
    assert meta["shards"]["train"] == len(list(out.glob("train_*.bin"))) >= 2
    # The trainer can read what it wrote.
    assert Split(out, "train").n_tokens == meta["tokens"]["train"]


def test_prepare_files_function(tmp_path):
    docs = synthetic_documents(n_docs=45, seed=11)
    inputs = _write_inputs(tmp_path / "in", docs)
    out = tmp_path / "out"
    meta = prepare(
        file_corpus(map(str, inputs)),
        out,
        source="files",
        command="cmd",
        val_fraction=0.25,
        test_fraction=0.25,
        shard_tokens=500,
        progress=False,
    )
    assert meta == _check_prepared(out, docs, 0.25, 0.25)


def test_prepare_cli_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "trainer.prepare",
            "files",
            str(bad),
            "--out",
            str(tmp_path / "o"),
            "--val-fraction",
            "0.3",
            "--test-fraction",
            "0.3",
        ],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert f"{bad}:2" in proc.stderr and "--text-field" in proc.stderr
    assert not (tmp_path / "o" / "meta.json").exists()


def test_split_assignment_is_deterministic_and_order_free(tmp_path):
    docs = synthetic_documents(n_docs=80, seed=5)
    assert [split_of(d, 0.2, 0.2) for d in docs] == [split_of(d, 0.2, 0.2) for d in docs]
    a = prepare(docs, tmp_path / "a", source="s", command="c", val_fraction=0.2, test_fraction=0.2, progress=False)
    b = prepare(
        list(reversed(docs)),
        tmp_path / "b",
        source="s",
        command="c",
        val_fraction=0.2,
        test_fraction=0.2,
        progress=False,
    )
    assert a["tokens"] == b["tokens"]
    for split in ("train", "val", "test"):
        assert sorted(_read_split_docs(tmp_path / "a", split)) == sorted(_read_split_docs(tmp_path / "b", split))
    c = prepare(docs, tmp_path / "c", source="s", command="c", val_fraction=0.2, test_fraction=0.2, progress=False)
    assert c["sha256"] == a["sha256"]  # same input, same order: identical bytes
    for split in ("train", "val", "test"):
        for x, y in zip(sorted((tmp_path / "a").glob(f"{split}_*")), sorted((tmp_path / "c").glob(f"{split}_*"))):
            assert x.read_bytes() == y.read_bytes()


def test_split_fractions_are_respected_on_average():
    texts = [f"document number {i}" for i in range(20000)]
    counts = {s: 0 for s in ("train", "val", "test")}
    for t in texts:
        counts[split_of(t, 0.1, 0.05)] += 1
    assert counts["test"] / len(texts) == pytest.approx(0.05, abs=0.01)
    assert counts["val"] / len(texts) == pytest.approx(0.1, abs=0.01)


def test_reprepare_replaces_old_shards(tmp_path):
    out = tmp_path / "o"
    prepare(
        synthetic_documents(60, seed=1),
        out,
        source="s",
        command="c",
        val_fraction=0.2,
        test_fraction=0.2,
        shard_tokens=300,
        progress=False,
    )
    many = len(list(out.glob("*.bin")))
    meta = prepare(
        synthetic_documents(60, seed=1),
        out,
        source="s",
        command="c",
        val_fraction=0.2,
        test_fraction=0.2,
        shard_tokens=100_000,
        progress=False,
    )
    assert len(list(out.glob("*.bin"))) == 3 < many
    assert Split(out, "train").n_tokens == meta["tokens"]["train"]


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_offline(tmp_path):
    """The bundled vocabulary works with no network and an empty tiktoken cache."""
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise OSError('network disabled in this test')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "from trainer.tokenizer import gpt2, EOT\n"
        "enc = gpt2()\n"
        "print(enc.encode('Hello world'), enc.n_vocab, enc.eot_token, enc.decode(enc.encode('Hello world')))\n"
    )
    env = subprocess_env()
    env["TIKTOKEN_CACHE_DIR"] = str(tmp_path / "empty-cache")
    proc = subprocess.run([PYTHON, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[15496, 995] 50257 50256 Hello world"


def test_tokenizer_in_process():
    enc = gpt2()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and EOT == 50256
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT]
    assert enc.encode_ordinary("<|endoftext|>") != [EOT]  # documents cannot forge a separator
