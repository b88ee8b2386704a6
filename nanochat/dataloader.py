"""Data loaders that cut token streams into B rows of T+1 tokens: pretraining documents from the parquet shards,
and rendered conversations for midtraining. They know nothing of models or optimizers.

Pretraining: streams the parquet shards of one split, tokenizes documents in parallel batches, prefixes each with
<|bos|> and packs them into B rows of T+1 tokens: inputs = row[:-1], targets = row[1:].
Every row starts with <|bos|>: a row that begins in the middle of a document gets a <|bos|> before
the continuation, so the model never sees a context that starts mid-text without the marker, and no
text is thrown away.

Sharding: the split's row groups are numbered globally (shard by shard, row group by row group) and
rank r of W reads row groups r, r+W, r+2W, ... so ranks never see the same text.

Exact resume: with every batch the loader yields its position *after* that batch:
    {"epoch": e, "rg": i, "doc": d, "tok": k}
meaning "the next window starts at token k of document d of the i-th row group of this rank, in
pass e over the data". Passing that dict back as resume_state re-reads the row group, re-tokenizes
from document d and skips k tokens, so the following batches are identical to an uninterrupted run
(tokenization is deterministic).
"""
from collections import deque

import numpy as np
import pyarrow.parquet as pq
import torch

from nanochat.common import get_dist_info, print0
from nanochat.dataset import split_files
from nanochat.tokenizer import get_tokenizer


def rank_row_groups(files, rank, world_size):
    """This rank's (path, row_group) pairs, in reading order."""
    pairs = []
    for path in files:
        n = pq.ParquetFile(path).num_row_groups
        pairs.extend((path, i) for i in range(n))
    mine = pairs[rank::world_size]
    if not mine:
        # Fewer row groups than ranks (a tiny val shard on many GPUs): share rather than starve.
        print0(f"warning: only {len(pairs)} row groups for {world_size} ranks; some ranks read the same data")
        mine = [pairs[rank % len(pairs)]]
    return mine


def _documents(row_groups, tokenizer, start, threads, batch_size):
    """Yield (epoch, rg, doc, tokens) forever, from position `start`; tokens include the leading bos.
    The first document yielded is already cut to begin at start["tok"]."""
    bos = tokenizer.get_bos_token_id()
    epoch, rg, doc, tok = start["epoch"], start["rg"], start["doc"], start["tok"]
    while True:
        path, rg_index = row_groups[rg]
        texts = pq.ParquetFile(path).read_row_group(rg_index, columns=["text"]).column("text").to_pylist()
        for b in range(doc, len(texts), batch_size):
            batch = tokenizer.encode(texts[b:b + batch_size], prepend=bos, num_threads=threads)
            for j, ids in enumerate(batch):
                if tok:  # resuming mid-document
                    ids, tok = ids[tok:], 0
                yield epoch, rg, b + j, ids
        doc = 0
        rg += 1
        if rg == len(row_groups):
            rg, epoch = 0, epoch + 1


def tokenizing_distributed_data_loader(B, T, split, tokenizer=None, device="cpu", resume_state=None,
                                       tokenizer_threads=4, tokenizer_batch_size=128):
    """Yield (inputs, targets, state) forever: inputs/targets (B, T) int64 on device, state the position
    after this batch (see the module docstring). Loops over the split in epochs."""
    if tokenizer is None:
        tokenizer = get_tokenizer()
    device = torch.device(device)
    _, rank, _, world_size = get_dist_info()
    row_groups = rank_row_groups(split_files(split), rank, world_size)
    start = dict(resume_state) if resume_state else {"epoch": 0, "rg": 0, "doc": 0, "tok": 0}
    if start["rg"] >= len(row_groups):
        raise ValueError(f"resume state {start} does not fit this rank's {len(row_groups)} row groups "
                         "(different data or world size?)")

    docs = _documents(row_groups, tokenizer, start, tokenizer_threads, tokenizer_batch_size)
    bos = tokenizer.get_bos_token_id()
    # [epoch, rg, doc, tokens, offset, skipped]: documents not fully consumed yet; `skipped` counts the
    # tokens cut off the front when resuming into this document, so skipped + offset is the position.
    pending = deque()

    def head():
        if not pending:
            pending.append([*next(docs), 0, 0])
            e, r, d = pending[0][:3]
            if (e, r, d) == (start["epoch"], start["rg"], start["doc"]):
                pending[0][5] = start["tok"]
        return pending[0]

    while True:
        rows = []
        for _ in range(B):
            item = head()
            row = [] if item[4] + item[5] == 0 else [bos]  # mid-document: restate the bos
            while len(row) < T + 1:
                item = head()
                ids, off = item[3], item[4]
                take = min(T + 1 - len(row), len(ids) - off)
                row.extend(ids[off:off + take])
                item[4] = off + take
                if item[4] == len(ids):
                    pending.popleft()
            rows.append(row)
        e, r, d, _, off, skipped = head()
        state = {"epoch": e, "rg": r, "doc": d, "tok": skipped + off}

        yield (*_to_device(torch.tensor(rows, dtype=torch.long), device), state)


def _to_device(rows, device):
    """(B, T+1) rows -> (inputs, targets) on device; through pinned memory on CUDA so the copy is async."""
    use_pinned = device.type == "cuda"
    if use_pinned:
        rows = rows.pin_memory()
    rows = rows.to(device, non_blocking=use_pinned)
    return rows[:, :-1], rows[:, 1:]


# ------------------------------------------------------------------------------------------------
# conversations (midtraining)


def render_stream(task, tokenizer, rank=0, world_size=1):
    """Render this rank's conversations (rank, rank+W, ...) into one token stream.
    -> (stream int32 array, starts bool array: True where a conversation begins)."""
    chunks, lengths = [], []
    for i in range(rank, len(task), world_size):
        ids, _ = tokenizer.render_conversation(task[i], max_tokens=10**9)
        chunks.append(np.asarray(ids, dtype=np.int32))
        lengths.append(len(ids))
    if not chunks:
        raise ValueError(f"rank {rank} of {world_size} has no conversations ({len(task)} in all)")
    stream = np.concatenate(chunks)
    starts = np.zeros(len(stream), dtype=bool)
    starts[np.cumsum([0] + lengths[:-1])] = True
    return stream, starts


def packed_loader(stream, starts, B, T, bos, device="cpu", resume_state=None):
    """Yield (inputs, targets, state) forever: B rows of T+1 tokens cut from the stream in order
    (wrapping around at the end = a new epoch). A row starting mid-conversation begins with a
    restated <|bos|>. state = {"epoch", "pos"} is the position after the batch (pass it back to resume)."""
    device = torch.device(device)
    n = len(stream)
    state = dict(resume_state) if resume_state else {"epoch": 0, "pos": 0}
    epoch, pos = state["epoch"], state["pos"] % n  # a resharded position may pass the end of a shorter stream
    while True:
        rows = np.empty((B, T + 1), dtype=np.int64)
        for b in range(B):
            if starts[pos]:
                rows[b] = np.take(stream, np.arange(pos, pos + T + 1), mode="wrap")
                pos += T + 1
            else:
                rows[b, 0] = bos
                rows[b, 1:] = np.take(stream, np.arange(pos, pos + T), mode="wrap")
                pos += T
            epoch, pos = epoch + pos // n, pos % n
        yield (*_to_device(torch.from_numpy(rows), device), {"epoch": epoch, "pos": pos})
