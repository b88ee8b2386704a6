"""KV caches for incremental decoding: what the model keeps of earlier tokens and where new ones go; it
knows nothing of the model beyond the tensor shapes it stores.

Every cache speaks one small interface that GPT.forward and attention call, so the model never asks which
cache it has:
    positions(T, device)   the absolute positions of the T input tokens: an int (the first one; rows share it)
                           or a tensor, (T,) or (B, T); called once per forward, before any layer
    mask                   None (attention is causal from those positions) or a bool mask (B, 1, T, Tk),
                           True = attend, which alone decides
    Tk                     the keys' length when positions are a tensor (the rotary table must cover it)
    insert_kv(layer, k, v) store this layer's k, v (B, H_kv, T, D) and return the keys and values to attend to
    get_pos()              the tokens already stored, for callers outside the forward
    prev_tokens(idx)       the token before each row's first input ((B,) long, -1 where a row starts its sequence),
                           remembering the input's last tokens for the next call; once per forward, by a model
                           that mixes the previous token's embedding in (GPTConfig.smear)

Three caches: KVCache (one sequence, or equal rows; grows as needed: the Engine's), StaticKVCache (fixed
capacity, position in a device tensor: a compiled decode step), RaggedKVCache (many sequences of different
lengths: the server's continuous batching, through `rows(slots, counts)`).
"""
import torch


class KVCache:
    """Keys and values of every layer for incremental decoding.

    Storage: one tensor of shape (num_layers, 2, batch_size, num_heads, seq_len, head_dim) (heads before
    time, the layout SDPA reads). `pos` counts the tokens already stored; the model reads it to offset
    the rotary angles and the causal mask, and it advances after the last layer has inserted.
    The tensor is allocated on the first insert (or `prefill`) with the keys' device/dtype unless
    device/dtype are given, and grows if a sequence runs past `seq_len`.
    """

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device=None, dtype=None):
        self.batch_size, self.num_heads, self.head_dim, self.num_layers = batch_size, num_heads, head_dim, num_layers
        self.seq_len = seq_len
        self.pos = 0
        self.kv = None
        self.mask = None  # rows are equal-length: attention is causal from pos
        self.last = None  # (B,) each row's last token so far (prev_tokens)
        if device is not None and dtype is not None:
            self._allocate(seq_len, device, dtype)

    def _allocate(self, seq_len, device, dtype):
        shape = (self.num_layers, 2, self.batch_size, self.num_heads, seq_len, self.head_dim)
        self.kv = torch.empty(shape, device=device, dtype=dtype)
        self.seq_len = seq_len

    def _ensure_capacity(self, needed, device, dtype):
        if self.kv is None:
            self._allocate(max(needed, self.seq_len), device, dtype)
        elif needed > self.kv.size(4):
            old = self.kv
            self._allocate(((needed + 255) // 256) * 256, old.device, old.dtype)
            self.kv[..., : self.pos, :] = old[..., : self.pos, :]

    def get_pos(self):
        return self.pos

    def positions(self, T, device):
        return self.pos

    def prev_tokens(self, idx):
        before = self.last if self.pos > 0 and self.last is not None else torch.full_like(idx[:, 0], -1)
        self.last = idx[:, -1].clone()
        return before

    def insert_kv(self, layer_idx, k, v):
        """Store k, v (B, H_kv, T, D) at positions [pos, pos+T) of this layer and return views of
        everything cached so far for this layer: (keys, values), each (B, H_kv, pos+T, D)."""
        T = k.size(2)
        end = self.pos + T
        self._ensure_capacity(end, k.device, k.dtype)
        self.kv[layer_idx, 0, :, :, self.pos:end] = k
        self.kv[layer_idx, 1, :, :, self.pos:end] = v
        keys, values = self.kv[layer_idx, 0, :, :, :end], self.kv[layer_idx, 1, :, :, :end]
        if layer_idx == self.num_layers - 1:
            self.pos = end
        return keys, values

    def prefill(self, other):
        """Copy another cache's contents (and position) into this one. `other` may have batch size 1
        (broadcast into every row, e.g. one prompt prefilled once, then N samples) or the same batch size."""
        assert (other.num_layers, other.num_heads, other.head_dim) == (self.num_layers, self.num_heads, self.head_dim)
        assert other.batch_size in (1, self.batch_size), "can only broadcast a batch-1 cache or copy an equal batch"
        assert other.kv is not None or other.pos == 0
        self.pos = 0
        self.last = None if other.last is None else other.last.expand(self.batch_size).clone()
        if other.kv is None:
            return
        self._ensure_capacity(other.pos, other.kv.device, other.kv.dtype)
        self.kv[..., : other.pos, :] = other.kv[..., : other.pos, :]
        self.pos = other.pos


class StaticKVCache:
    """A fixed-capacity cache whose position lives in a device tensor, so every decode step has the same shapes
    and no host sync: attention reads the whole capacity under a mask of the filled positions, new keys and
    values go in with index_copy_. That makes the step compilable once (and on CUDA capturable as a graph);
    the price is reading the unused tail of the capacity, so size it to what the call can use.
    Storage and layout as KVCache: (num_layers, 2, batch_size, num_heads, capacity, head_dim).
    The model asks `positions(T, device)` first (rotary angles); attention then reads `mask`."""

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device, dtype):
        self.batch_size, self.num_heads, self.head_dim, self.num_layers = batch_size, num_heads, head_dim, num_layers
        self.kv = torch.zeros(num_layers, 2, batch_size, num_heads, seq_len, head_dim, device=device, dtype=dtype)
        self.Tk = seq_len  # attention always spans the whole capacity
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # tokens stored (same for every row)
        self.slots = torch.arange(seq_len, device=device)
        self.mask = self.times = None  # set by positions() at the start of every forward
        self.last = torch.full((batch_size,), -1, dtype=torch.long, device=device)  # (prev_tokens)

    def get_pos(self):
        return int(self.pos)  # a host sync: for callers outside the decode loop

    def load(self, other):
        """Copy a KVCache's contents and position (batch 1 is broadcast into every row)."""
        assert other.kv is not None and other.pos <= self.Tk, "the source cache is empty or longer than this one"
        self.kv[..., : other.pos, :] = other.kv[..., : other.pos, :]
        self.pos.fill_(other.pos)
        self.last.copy_(other.last.expand_as(self.last) if other.last is not None else torch.full_like(self.last, -1))

    def positions(self, T, device):
        """(T,) absolute positions of the input tokens; sets mask (1, 1, T, capacity): True = attend."""
        times = self.pos + self.slots[:T]
        self.mask = self.slots[None, None, None, :] <= times[None, None, :, None]
        self.times = times
        return times

    def prev_tokens(self, idx):
        before = torch.where(self.pos > 0, self.last, -1)  # tensors only: no host sync in a compiled step
        self.last.copy_(idx[:, -1])
        return before

    def insert_kv(self, layer_idx, k, v):
        """Write k, v (B, H, T, D) at the positions given by the last positions() call; return the whole
        capacity (keys, values), each (B, H, capacity, D)."""
        store = self.kv[layer_idx]
        store[0].index_copy_(2, self.times, k.to(store.dtype))
        store[1].index_copy_(2, self.times, v.to(store.dtype))
        if layer_idx == self.num_layers - 1:
            self.pos += self.times.numel()
        return store[0], store[1]


class RaggedKVCache:
    """Keys and values of many independent sequences ("slots") of different lengths, for continuous batching.

    Storage: (num_layers, 2, num_slots, num_heads, capacity, head_dim), allocated on the first insert with the
    keys' device/dtype and grown along time when a slot needs more. `lengths[s]` counts the tokens slot s holds.
    A forward runs over some of the slots: `model(ids, kv_cache=cache.rows(slots, counts))`, where row i of
    ids (n, T) continues slot slots[i] with counts[i] real tokens, right-padded to T. Each row gets its own
    rotary positions and a mask so it attends only to its own slot: its cached prefix, then causally within
    the chunk. Padding is written but never attended to (it lies past the row's length) and is overwritten
    by the row's next tokens. After the last layer each slot's length grows by its count.
    """

    def __init__(self, num_slots, num_heads, head_dim, num_layers, seq_len=256):
        self.num_slots, self.num_heads, self.head_dim, self.num_layers = num_slots, num_heads, head_dim, num_layers
        self.seq_len = seq_len  # initial capacity along time
        self.lengths = [0] * num_slots
        self.written = [0] * num_slots  # positions of slot s written since its last reset (padding included)
        self.kv = None
        self.last = None  # (num_slots,) each slot's last token (prev_tokens), on the model's device

    def _ensure_capacity(self, needed, device, dtype):
        if self.kv is not None and needed <= self.kv.size(4):
            return
        size = max(self.seq_len, ((needed + 255) // 256) * 256)
        shape = (self.num_layers, 2, self.num_slots, self.num_heads, size, self.head_dim)
        new = torch.zeros(shape, device=device, dtype=dtype)
        if self.kv is not None:
            new[..., : self.kv.size(4), :] = self.kv
        self.kv = new

    def reset(self, slot):
        """Forget slot's tokens (the slot is reused by another sequence). What they wrote is zeroed: a ragged batch
        reads past a row's length (masked, weight 0), and 0 x NaN left there by a broken sequence would be NaN."""
        if self.kv is not None and self.written[slot]:
            self.kv[:, :, slot, :, : self.written[slot]].zero_()
        self.lengths[slot] = self.written[slot] = 0

    def rows(self, slots, counts):
        """The view a forward over these slots uses (see the class docstring)."""
        assert len(slots) == len(counts) and len(set(slots)) == len(slots), "each slot at most once per forward"
        return _RaggedRows(self, list(slots), list(counts))


class _RaggedRows:
    """One forward's view of a RaggedKVCache: which slots the batch rows continue and how many real tokens each
    brings. The model asks `positions(T, device)` first (rotary angles); attention then reads `mask`."""

    def __init__(self, cache, slots, counts):
        self.cache, self.slots, self.counts = cache, slots, counts
        self.mask = None

    def get_pos(self):
        return self.start  # the rows' common start position, or None when they differ (see positions)

    def prev_tokens(self, idx):
        """Each row's slot's last token (-1 for a slot starting afresh); then each row's last real token is kept."""
        cache, device = self.cache, idx.device
        if cache.last is None:
            cache.last = torch.full((cache.num_slots,), -1, dtype=torch.long, device=device)
        slots = torch.tensor(self.slots, device=device)
        started = torch.tensor([cache.lengths[s] > 0 for s in self.slots], device=device)
        before = torch.where(started, cache.last[slots], -1)
        ends = torch.tensor(self.counts, device=device) - 1  # rows are right-padded past their counts
        cache.last[slots] = idx[torch.arange(len(self.slots), device=device), ends]
        return before

    def positions(self, T, device):
        """The input tokens' absolute positions: an int when every row starts at the same position (then
        attention runs as for one sequence, no mask), else an (n, T) tensor, and `mask` (n, 1, T, Tk)."""
        starts = [self.cache.lengths[s] for s in self.slots]
        self.T, self.Tk = T, max(starts) + T
        first = self.slots[0]
        # a run of consecutive slots is read and written as a view (no copy); anything else is gathered
        consecutive = self.slots == list(range(first, first + len(self.slots)))
        self.span = slice(first, first + len(self.slots)) if consecutive else None
        self.index = None if consecutive else torch.tensor(self.slots, device=device)
        if len(set(starts)) == 1:
            self.start, self.mask, self.times = starts[0], None, None
            return self.start
        self.start = None
        self.times = torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)[None, :]
        self.mask = torch.arange(self.Tk, device=device)[None, None, None, :] <= self.times[:, None, :, None]
        return self.times

    def insert_kv(self, layer_idx, k, v):
        """Write k, v (n, H_kv, T, D) at each row's positions; return (keys, values), each (n, H_kv, Tk, D)."""
        cache = self.cache
        cache._ensure_capacity(self.Tk, k.device, k.dtype)
        rows = self.span if self.span is not None else self.index
        out = []
        for i, x in enumerate((k, v)):
            store = cache.kv[layer_idx, i]  # (slots, H, capacity, D)
            if self.times is None:
                store[rows, :, self.start:self.Tk] = x.to(store.dtype)
            else:
                r = rows if self.span is None else torch.arange(rows.start, rows.stop, device=x.device)
                store[r[:, None], :, self.times] = x.transpose(1, 2).to(store.dtype)  # -> (n, T, H, D)
            out.append(store[rows, :, : self.Tk])
        if layer_idx == cache.num_layers - 1:
            for s, c in zip(self.slots, self.counts):
                cache.written[s] = max(cache.written[s], cache.lengths[s] + self.T)
                cache.lengths[s] += c
        return out[0], out[1]
