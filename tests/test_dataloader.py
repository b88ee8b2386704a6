"""Tokenizing distributed data loader: layout of batches, rank sharding, exact resume."""
import os
from itertools import islice

import pyarrow.parquet as pq
import pytest
import torch

from nanochat.dataloader import rank_row_groups, split_files, tokenizing_distributed_data_loader

B, T = 2, 16


def expected_docs(tok, files, rank=0, world=1):
    """The documents a rank should see (one pass), each bos + tokens, in row-group order."""
    docs = []
    for path, rg in rank_row_groups(files, rank, world):
        for text in pq.ParquetFile(path).read_row_group(rg).column("text").to_pylist():
            docs.append([tok.get_bos_token_id()] + tok.encode(text))
    return docs


def pack_rows(docs, bos, n_rows):
    """Reference packing: rows of T+1 tokens filled from the documents in order; a row that starts
    in the middle of a document restates bos first."""
    rows, d, off = [], 0, 0
    while len(rows) < n_rows:
        row = [] if off == 0 else [bos]
        while len(row) < T + 1:
            take = min(T + 1 - len(row), len(docs[d]) - off)
            row += docs[d][off:off + take]
            off += take
            if off == len(docs[d]):
                d, off = d + 1, 0
        rows.append(row)
    return rows


def loader_rows(batches):
    return [torch.cat([x[i], y[i, -1:]]).tolist() for x, y, _ in batches for i in range(x.shape[0])]


def take(loader, n):
    return list(islice(loader, n))


def set_rank(monkeypatch, rank, world):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))


def test_shapes_shift_and_stream(base_dir, byte_tokenizer):
    loader = tokenizing_distributed_data_loader(B, T, "train", tokenizer=byte_tokenizer, tokenizer_batch_size=5)
    batches = take(loader, 50)
    bos = byte_tokenizer.get_bos_token_id()
    for x, y, state in batches:
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets = inputs shifted by one
        assert (x[:, 0] == bos).all()  # every row starts with bos
        assert set(state) == {"epoch", "rg", "doc", "tok"}
    # the rows are exactly the bos-prefixed documents packed in order
    rows = loader_rows(batches)
    docs = expected_docs(byte_tokenizer, split_files("train"))
    assert rows == pack_rows(docs, bos, len(rows))
    # documents longer than a row exist, so rows that restate bos mid-document are exercised
    assert any(len(d) > T + 1 for d in docs[:10])


def test_splits_are_disjoint_and_val_loops(base_dir, byte_tokenizer):
    train, val = split_files("train"), split_files("val")
    assert len(train) == 2 and len(val) == 1 and not set(train) & set(val)
    # val is one shard of 4 row groups of ~300-byte docs: 400 windows of 33 tokens go past its end
    n_tokens = sum(map(len, expected_docs(byte_tokenizer, val)))
    loader = tokenizing_distributed_data_loader(B, T, "val", tokenizer=byte_tokenizer)
    n = n_tokens // (B * T) + 3  # every row consumes at least T document tokens
    *_, (_, _, state) = take(loader, n)
    assert state["epoch"] == 1


def test_ranks_read_disjoint_row_groups(base_dir, byte_tokenizer, monkeypatch):
    files = split_files("train")
    all_pairs = rank_row_groups(files, 0, 1)
    parts = [rank_row_groups(files, r, 3) for r in range(3)]
    assert sorted(p for part in parts for p in part) == sorted(all_pairs)
    assert all(not set(parts[i]) & set(parts[j]) for i in range(3) for j in range(i + 1, 3))
    # each rank's loader streams exactly its own row groups
    for rank in range(2):
        set_rank(monkeypatch, rank, 2)
        rows = loader_rows(take(tokenizing_distributed_data_loader(B, T, "train", tokenizer=byte_tokenizer), 20))
        docs = expected_docs(byte_tokenizer, files, rank, 2)
        assert rows == pack_rows(docs, byte_tokenizer.get_bos_token_id(), len(rows))


def test_more_ranks_than_row_groups(base_dir, byte_tokenizer, monkeypatch):
    set_rank(monkeypatch, 5, 6)  # val has 4 row groups: rank 5 shares one instead of starving
    x, y, _ = next(tokenizing_distributed_data_loader(B, T, "val", tokenizer=byte_tokenizer))
    assert x.shape == (B, T)


@pytest.mark.parametrize("doc_len", [None, 2 * 8])  # random lengths; docs that end exactly at a window end
def test_resume_gives_identical_batches(tmp_path, monkeypatch, byte_tokenizer, make_docs, write_shards, doc_len):
    # small data so the run wraps around into the next epoch
    b, t = 2, 8
    if doc_len is None:
        docs = make_docs(18, seed=7, min_words=1, max_words=12)
    else:  # bos + doc_len bytes = b*t+1 tokens: every batch consumes exactly one document
        docs = [("abcdefghijklmnopqrstuvwxyz"[i % 26] * doc_len)[:doc_len] for i in range(18)]
    it = iter(docs)
    write_shards(str(tmp_path / "base_data"), [[[next(it) for _ in range(3)] for _ in range(2)] for _ in range(3)])
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    kwargs = dict(tokenizer=byte_tokenizer, tokenizer_batch_size=2)
    n = 60
    ref = take(tokenizing_distributed_data_loader(b, t, "train", **kwargs), n)
    assert ref[-1][2]["epoch"] >= 1, "the test should cross an epoch boundary"
    for k in [0, 1, 2, 5, 13, 29, 41]:
        state = ref[k][2]
        resumed = take(tokenizing_distributed_data_loader(b, t, "train", resume_state=state, **kwargs), 8)
        for (x, y, s), (rx, ry, rs) in zip(ref[k + 1:k + 9], resumed):
            assert torch.equal(x, rx) and torch.equal(y, ry) and s == rs
    # a state saved after a resume resumes correctly too (offsets compose)
    state = ref[3][2]
    first = take(tokenizing_distributed_data_loader(b, t, "train", resume_state=state, **kwargs), 2)
    again = take(tokenizing_distributed_data_loader(b, t, "train", resume_state=first[0][2], **kwargs), 1)
    assert torch.equal(again[0][0], ref[5][0])


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch, byte_tokenizer):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    os.makedirs(tmp_path / "base_data")
    with pytest.raises(FileNotFoundError, match="nanochat.dataset"):
        next(tokenizing_distributed_data_loader(B, T, "train", tokenizer=byte_tokenizer))
