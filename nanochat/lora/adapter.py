"""LoRA adapters on the GPT's block matrices: creating, stacking and merging them into the weights, and
applying them in the forward (a stack, or a different adapter per batch row); saving and loading is
nanochat/lora/storage.py's job, routing nanochat/lora/router.py's, training nanochat/continual/adapter_train.py's,
combining nanochat/lora/merge.py's.

    lora = LoRA(model)                          # hooks every target Linear, freezes the base
    lora.add("facts", rank=8, alpha=16)         # A random, B zero: the model is unchanged
    lora.activate("facts")                      # O(1): the hooks read `lora.stack`
    lora.activate(["domain", "facts"], weights=[1.0, 0.5])   # a stack: both apply, in order
    ... train lora.adapters["facts"].parameters() ...
    lora.activate(None)                         # back to the base model, bit for bit

How it works. An adapter holds, for each target Linear W (out x in) of each block, a pair
A (r x in), B (out x r); the layer then computes W x + (alpha / r) * B A x. Targets are the six
matrices of a block: attn.c_q, attn.c_k, attn.c_v, attn.c_proj, mlp.c_fc, mlp.c_proj.
The extra term is added by a forward hook on each target module, so the GPT module tree and its
state_dict are untouched: checkpoints, the Engine and the KV cache work as before, and several
adapters can stay resident with one active (switching is a pointer swap).

Stacking. The active set is a stack: an ordered list of (adapter, weight) pairs, and each target
layer computes W x + sum_k w_k (alpha_k / r_k) B_k A_k x - the same as merging the adapters into W one
after the other. A nested adapter is trained with a stack beneath it (frozen) and is only meaningful
on top of that stack; its adapter.json records it ("provenance": {"stacked_on": [...]}).

Serving (per_row, the scheduler's path) folds by itself: a stack that stays on every row of the batch
for FOLD_AFTER forwards is merged into a copy of the target weights, swapped in for those forwards (no
hooks, the base model's speed) and kept for the next ones; a mixed batch uses the hooks on the untouched
base. One such copy is kept.

merge() folds the active stack into the weights (no extra matmuls at inference); it keeps a copy
of the original weights, and unmerge() copies them back, so the base is restored bit for bit
(subtracting B A again would leave rounding errors).

Per-row mode keeps rows apart even when an adapter is broken: other rows' columns of the packed product are
filled with 0 (not multiplied by it: 0 x NaN is NaN) and the packed B holds no NaN/inf. storage.load_adapter
refuses such adapters anyway (storage.check_values).

An adapter only makes sense on the weights it was trained on: LoRA records a hash of the base
model's state when it attaches (model_state_hash), saved adapters carry it in adapter.json, and
load_adapter raises AdapterBaseMismatch for a different base.
"""
import datetime
import hashlib
import re
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.fastlinear import PackedLinear

DEFAULT_TARGETS = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
PACK_CACHE = 8  # packed stack mixes kept per LoRA
# per_row: forwards in a row with one stack on every row before it is folded into a copy of the weights
FOLD_AFTER = 4
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class AdapterBaseMismatch(ValueError):
    """An adapter was trained on different base weights than the model it is being loaded onto."""


def validate_name(name):
    """Adapter names become directory names (and URL parts in chat_web): letters, digits, . _ -"""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"bad adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return name


def model_state_hash(model):
    """A stable hash of the model's weights: every state_dict tensor as fp32 bytes, by sorted name.
    fp32 so the same checkpoint hashes the same whether it was loaded as bf16 on a GPU or upcast on CPU."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(memoryview(t.numpy()).cast("B"))
    return h.hexdigest()


class Adapter(nn.Module):
    """The A/B pairs of one adapter, one per target module, in `modules` order."""

    def __init__(self, name, modules, shapes, rank, alpha, targets, device=None, dtype=torch.float32):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.name, self.rank, self.alpha = name, int(rank), float(alpha)
        self.scale = self.alpha / self.rank
        self.targets = tuple(targets)
        self.modules_ = list(modules)  # module keys like "h.0.attn.c_q"
        self.index = {k: i for i, k in enumerate(self.modules_)}
        self.A = nn.ParameterList([nn.Parameter(torch.empty(rank, fin, device=device, dtype=dtype))
                                   for fout, fin in shapes])
        self.B = nn.ParameterList([nn.Parameter(torch.zeros(fout, rank, device=device, dtype=dtype))
                                   for fout, fin in shapes])
        self.centroid = None  # router: mean base hidden state of the adapter's training data
        self.keys = self.general_keys = None  # router.route_auto: hidden means of its own and of general prompts
        self.anchors = None  # router.route_auto: word stems its prompts name and general chats do not
        self.info = {}  # task, metrics, created: what goes into adapter.json
        self._tensors = [*self.A, *self.B]  # a plain list: summing their versions every forward stays cheap
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator=None):
        # A ~ U(-1/sqrt(in), 1/sqrt(in)) (the usual kaiming_uniform(a=sqrt(5)) bound), B = 0: the
        # adapter starts as an exact no-op and B gets a useful gradient from the first step
        for a, b in zip(self.A, self.B):
            bound = a.size(1) ** -0.5
            a.copy_(torch.rand(a.shape, generator=generator, dtype=torch.float32).to(a) * 2 * bound - bound)
            b.zero_()

    def delta(self, i, x):
        """(alpha / r) * B_i A_i x for the i-th module, in the dtype of A."""
        return F.linear(F.linear(x.to(self.A[i].dtype), self.A[i]), self.B[i]) * self.scale

    def weight_delta(self, i):
        return (self.B[i] @ self.A[i]) * self.scale

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def num_bytes(self):
        """Bytes of the adapter's weights (what adapter.safetensors holds, less the header)."""
        tensors = [*self.parameters(), self.centroid, self.keys, self.general_keys]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class LoRA:
    """Adapters for one GPT: hooks on its target Linears, a dict of resident adapters, one active.

    Creating it freezes every base parameter (requires_grad False); close() undoes that and removes
    the hooks. The base hash is taken here, before any merge."""

    def __init__(self, model, targets=DEFAULT_TARGETS):
        bad = [t for t in targets if t not in DEFAULT_TARGETS]
        if bad:
            raise ValueError(f"unknown LoRA targets {bad}; choose from {DEFAULT_TARGETS}")
        if getattr(model, "_lora", None) is not None:
            raise RuntimeError("this model already has a LoRA attached; reuse it (model._lora) or close() it first")
        if any(isinstance(m, PackedLinear) for m in model.modules()):  # (quantized Linears are fine)
            raise RuntimeError("LoRA needs the model's nn.Linear layers; this model's were replaced (packed for "
                               "inference?): attach adapters to an unpacked model")
        self.model = model
        self.targets = tuple(targets)
        self.modules = {}  # "h.<layer>.<target>" -> nn.Linear, in block order
        for i, block in enumerate(model.transformer.h):
            for t in self.targets:
                self.modules[f"h.{i}.{t}"] = block.get_submodule(t)
        self.base_hash = model_state_hash(model)
        self.adapters = {}
        self.stack = ()  # ((name, weight), ...) the hooks apply, in order; () is the base model
        self._merged_stack = None  # the stack folded into the weights, or None
        self._saved_weights = None
        self._enabled = True
        self._rows = None  # per-row mode (per_row): (row -> stack index tensor or None, [stack, ...]), else None
        self._plan = None  # what the hooks apply in this forward (see _make_plan); None: work it out again
        self._packs = {}  # module key -> packed (A, B) of the plan's stacks (see _pack)
        self._pack_cache = {}  # plan signature -> its _packs, the last few (a batch's mix comes and goes)
        self.fold_after = FOLD_AFTER  # per_row folding (see _folded_weights); 0: never
        self._fold = None  # (signature, pairs, {module key: folded weight}): one folded stack, kept for reuse
        self._fold_seen = (None, 0)  # the last uniform mix per_row saw, and how many forwards in a row
        self._folded_now = False  # inside per_row with the fold swapped in: the hooks have nothing to add
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        self._handles = [m.register_forward_hook(self._hook(k)) for k, m in self.modules.items()]
        # each forward of the model checks the plan again (an optimizer step changes adapters in place)
        self._handles.append(model.register_forward_pre_hook(lambda m, a: setattr(self, "_plan", None)))
        model._lora = self  # a plain attribute: not a submodule, so the state_dict is unchanged

    def _hook(self, key):
        def hook(module, inputs, output):
            if not self._enabled or self._folded_now or (
                    self._rows is None and (not self.stack or self._merged_stack is not None)):
                return None
            plan = self._plan
            if plan is None or plan[4] != torch.is_grad_enabled():
                plan = self._make_plan()
            return self._apply(key, inputs[0], output, plan)
        return hook

    def _make_plan(self):
        """Which stacks of (Adapter, weight) pairs this forward applies and how. Every frozen adapter goes into
        one packed low-rank update per module (_pack): a stack of five is two matmuls, not ten. An adapter
        being trained (grad on, requires_grad) stays a separate term so its gradient flows; the top adapter of
        a nested stack is one. Per-row mode packs every row's stack side by side and masks the columns."""
        grad = torch.is_grad_enabled()
        if self._rows is not None:
            row_stack, stacks = self._rows
            if grad and any(p.requires_grad for st in stacks for ad, _ in st for p in ad.parameters()):
                raise RuntimeError("per_row() is for inference; train an adapter with activate() (or under no_grad)")
            loose = ()
        else:
            row_stack = None
            pairs = [(self.adapters[n], w) for n, w in self.stack]
            training = [grad and ad.A[0].requires_grad for ad, _ in pairs]
            loose = tuple(pw for pw, t in zip(pairs, training) if t)
            stacks = [tuple(pw for pw, t in zip(pairs, training) if not t)]
        sig = (tuple(stacks), tuple(_version(ad) for st in stacks for ad, _ in st))
        packs = self._pack_cache.pop(sig, None)
        if packs is None:
            packs = {}
            if len(self._pack_cache) >= PACK_CACHE:  # forget the least recently used
                self._pack_cache.pop(next(iter(self._pack_cache)))
        self._pack_cache[sig] = self._packs = packs
        self._plan = (row_stack, stacks, loose, {}, grad)
        return self._plan

    def _pack(self, key, stacks):
        """For module `key`: A^T (in x C) and B^T (C x out) holding every stack's adapters side by side, B's
        columns pre-scaled by weight * alpha / r, and which stack each column belongs to (C,). None: nothing
        targets key. Stored transposed and contiguous: small matmuls ran up to 2x faster than through a .t() view
        (CPU, decode sizes)."""
        if key in self._packs:
            return self._packs[key]
        As, Bs, owner = [], [], []
        with torch.no_grad():
            for s, st in enumerate(stacks):
                for ad, w in st:
                    i = ad.index.get(key)
                    if i is not None:
                        As.append(ad.A[i].detach())
                        # a non-finite B would turn the zeros other rows hold in its columns into NaN (0 x inf);
                        # its own rows are garbage either way (A's NaN/inf reach them through h)
                        Bs.append(torch.nan_to_num(ad.B[i].detach() * (ad.scale * w), nan=0.0, posinf=0.0,
                                                   neginf=0.0))
                        owner += [s] * ad.rank
        pack = None
        if As:
            pack = (torch.cat(As).t().contiguous(), torch.cat(Bs, dim=1).t().contiguous(),
                    torch.tensor(owner, device=As[0].device), tuple(owner))
        self._packs[key] = pack
        return pack

    def _apply(self, key, x, output, plan):
        """output + every term the plan puts on module `key`: the packed frozen adapters (masked per row in
        per-row mode) and each adapter being trained."""
        row_stack, stacks, loose, masks, _ = plan
        for ad, w in loose:
            i = ad.index.get(key)
            if i is not None:
                d = ad.delta(i, x)
                output = output + (d if w == 1.0 else d * w).to(output.dtype)
        pack = self._pack(key, stacks)
        if pack is None:
            return output if loose else None
        At, Bt, owner, layout = pack
        x2 = x.reshape(-1, x.size(-1))
        h = torch.mm(x2 if x2.dtype == At.dtype else x2.to(At.dtype), At)
        if row_stack is not None:  # row r keeps only the columns of its own stack (-1: none, the base model)
            drop = masks.get(layout)
            if drop is None:
                drop = masks[layout] = row_stack[:, None] != owner[None, :]
            # filled, not multiplied by 0: another row's NaN/inf (from a broken adapter's A) must not survive
            h.view(drop.size(0), -1, h.size(-1)).masked_fill_(drop[:, None, :], 0.0)
        out2 = output.reshape(-1, output.size(-1))
        if h.dtype == output.dtype:  # output + h B^T as one addmm: one op fewer per layer (decode is op-bound)
            if not output.requires_grad:
                # inference: add into the base output in place. A fresh (tokens x out) result per module cost
                # more than the low-rank product itself (d8 prefill, c_fc: 3.8 ms out of place, 0.75 ms in place)
                return out2.addmm_(h, Bt).view_as(output)
            return torch.addmm(out2, h, Bt).view_as(output)
        return (out2 + torch.mm(h, Bt).to(output.dtype)).view_as(output)

    @staticmethod
    def _names(stack):
        """How `active` / `merged` report a stack: None, one name, or a list of names."""
        if not stack:
            return None
        if len(stack) == 1 and stack[0][1] == 1.0:
            return stack[0][0]
        return [n for n, _ in stack]

    @property
    def active(self):
        """None (the base model), the active adapter's name, or the list of names of a stack."""
        return self._names(self.stack)

    @property
    def merged(self):
        """What is folded into the weights, reported like `active` (None: nothing)."""
        return self._names(self._merged_stack) if self._merged_stack is not None else None

    @contextmanager
    def per_row(self, stacks):
        """Inside the block, row r of each forward's batch gets stacks[r]: an Adapter object (e.g.
        lora.adapters[name]), a sequence of (Adapter, weight) pairs applied together, or None for the base
        weights, whatever is active: requests for different adapters and stacks share one batch. All rows'
        adapters are packed side by side into one A and one B per module (cached while they stay the same)
        and each row keeps only its own columns: two matmuls and a mask whatever the mix. The base weights
        are untouched. Adapter objects, not names, so one that is replaced or removed meanwhile keeps
        serving the rows that hold it."""
        if self._merged_stack is not None:
            raise RuntimeError(f"adapter {self.merged!r} is merged into the weights; unmerge() before per-row use")
        rows, distinct = [], {}
        for st in stacks:
            st = ((st, 1.0),) if isinstance(st, Adapter) else tuple((ad, float(w)) for ad, w in (st or ()))
            key = tuple((id(ad), w) for ad, w in st) if st else None
            if key is not None:
                distinct[key] = st
            rows.append(key)
        keys = sorted(distinct)  # the same mix in any row order packs the same way: its cached packs are reused
        ordered, where = [distinct[k] for k in keys], {k: i for i, k in enumerate(keys)}
        index = [-1 if k is None else where[k] for k in rows]
        uniform = len(ordered) == 1 and -1 not in index
        folded = self._folded_weights(ordered[0]) if uniform else None
        if folded is not None:  # swap the folded copies in: the block is the base model's forward, no hooks
            saved = {k: self.modules[k]._parameters["weight"] for k in folded}
            for k, w in folded.items():
                self.modules[k]._parameters["weight"] = w
            self._folded_now = True
            try:
                yield
            finally:
                self._folded_now = False
                for k, w in saved.items():
                    self.modules[k]._parameters["weight"] = w
            return
        # one stack on every row: no mask needed, the same as activate() for the whole batch
        row_stack = None if uniform else torch.tensor(index, device=self.model.get_device())
        self._rows, self._plan = (row_stack, ordered), None
        try:
            yield
        finally:
            self._rows, self._plan = None, None

    def _folded_weights(self, pairs):
        """Serving's common case is one stack on every row for many forwards in a row (a batch of requests
        for one adapter, or one request decoding): after fold_after such forwards, per_row serves it from a
        copy of the target weights with the stack merged in (merge()'s arithmetic), which costs nothing per
        token where the hooks cost 10-20% at decode (small matmuls against a small forward). One folded
        stack is kept: the memory of the target weights once more. -> {module key: weight} or None (use
        the hooks: not yet, folding off, gradients on for an adapter, or quantized weights)."""
        sig = tuple((id(ad), w, _version(ad)) for ad, w in pairs)
        if self._fold is not None and self._fold[0] == sig:
            return self._fold[2]
        seen = self._fold_seen[1] + 1 if self._fold_seen[0] == sig else 1
        self._fold_seen = (sig, seen)
        if not self.fold_after or seen < self.fold_after:
            return None
        keys = [k for k in self.modules if any(k in ad.index for ad, _ in pairs)]
        if torch.is_grad_enabled() and any(p.requires_grad for ad, _ in pairs for p in ad.parameters()) or \
                not self._mergeable(keys):
            return None
        self._fold = None  # the old copy goes before the new one is made
        with torch.no_grad():
            weights = {k: self.modules[k].weight.detach().clone() for k in keys}
            _add_deltas(weights, pairs)
        folded = {k: nn.Parameter(w, requires_grad=False) for k, w in weights.items()}
        self._fold = (sig, pairs, folded)
        return folded

    def _mergeable(self, keys):
        """Whether the weights of these modules can take an adapter's delta (a quantized one cannot)."""
        return all(self.modules[k].weight.dtype in (torch.float32, torch.bfloat16, torch.float16) for k in keys)

    def close(self):
        """Remove the hooks, restore the base weights and the parameters' requires_grad flags."""
        if self._merged_stack is not None:
            self.unmerge()
        for h in self._handles:
            h.remove()
        self._handles = []
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad.get(n, True))
        self.model._lora = None

    # --- adapters ---------------------------------------------------------------------------
    def add(self, name, rank=8, alpha=16.0, targets=None, seed=None, info=None):
        """Create an adapter (A random, B zero) on the model's device. Not activated."""
        validate_name(name)
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists; remove it first")
        targets = tuple(targets or self.targets)
        bad = [t for t in targets if t not in self.targets]
        if bad:
            raise ValueError(f"targets {bad} are not hooked by this LoRA (hooked: {self.targets})")
        keys = [k for k in self.modules if k.split(".", 2)[2] in targets]
        # (out, in) from the module, not its weight: a 4-bit weight is packed two values per byte
        shapes = [(self.modules[k].out_features, self.modules[k].in_features) for k in keys]
        device = self.model.get_device()
        ad = Adapter(name, keys, shapes, rank, alpha, targets, device=device)
        if seed is not None:
            ad.reset_parameters(torch.Generator().manual_seed(seed))
        ad.info = {"task": None, "metrics": {}, "created": _now(), **(info or {})}
        self.adapters[name] = ad
        return ad

    def remove(self, name):
        if name not in self.adapters:
            raise KeyError(f"no adapter {name!r} (resident: {sorted(self.adapters)})")
        if self._merged_stack is not None and any(n == name for n, _ in self._merged_stack):
            self.unmerge()
        self.stack = tuple((n, w) for n, w in self.stack if n != name)  # the rest of a stack stays
        self._plan = None
        gone = self.adapters.pop(name)
        # its packs go too (a request still holding it repacks once), so they don't keep it in memory
        self._pack_cache = {sig: p for sig, p in self._pack_cache.items()
                            if not any(ad is gone for st in sig[0] for ad, _ in st)}
        if self._fold is not None and any(ad is gone for ad, _ in self._fold[1]):
            self._fold = None

    def make_stack(self, names, weights=None):
        """names (None, a name, or a list of names) and weights (default 1.0 each) -> ((name, weight), ...),
        checked: every adapter resident, no name twice, one finite weight per name."""
        if names is None:
            if weights:
                raise ValueError("weights given but no adapters")
            return ()
        names = [names] if isinstance(names, str) else list(names)
        weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} adapters but {len(weights)} weights; give one weight per adapter")
        if len(set(names)) != len(names):
            raise ValueError(f"an adapter appears twice in the stack {names}")
        missing = [n for n in names if n not in self.adapters]
        if missing:
            raise KeyError(f"no adapter {missing[0]!r} (resident: {sorted(self.adapters)})")
        if not all(w == w and abs(w) != float("inf") for w in weights):
            raise ValueError(f"stack weights must be finite numbers, got {weights}")
        return tuple(zip(names, weights))

    def activate(self, names, weights=None, merge=False):
        """Make `names` active: None (the base model), one adapter name, or a list of names applied
        together in that order, each times its weight (default 1.0). O(1) unless merging; merge=True
        folds the stack into the weights (an unmerged one is unmerged first: the base comes back exactly)."""
        stack = self.make_stack(names, weights)
        if self._merged_stack is not None and self._merged_stack != stack:
            self.unmerge()
        self.stack, self._plan = stack, None
        if merge and stack and self._merged_stack != stack:
            self.merge()

    def freeze(self, name, frozen=True):
        """Stop (or restart) gradients into adapter `name`: what sits beneath a nested adapter is frozen."""
        self.adapters[name].requires_grad_(not frozen)
        self._plan = None  # a frozen adapter is packed with the others, a trainable one is not

    def deactivate(self):
        self.activate(None)

    @contextmanager
    def base_only(self):
        """Run the base model inside the block, whatever is active or merged."""
        merged = self._merged_stack
        if merged is not None:
            self.unmerge()
        self._enabled = False
        try:
            yield
        finally:
            self._enabled = True
            if merged is not None:
                self.merge()

    @torch.no_grad()
    def merge(self):
        """Fold the active stack into the weights, one adapter after the other (keeping the originals
        for unmerge)."""
        if not self.stack:
            raise RuntimeError("no active adapter to merge")
        if self._merged_stack is not None:
            raise RuntimeError(f"{self.merged!r} is already merged")
        keys = {k for n, _ in self.stack for k in self.adapters[n].modules_}
        if not self._mergeable(keys):
            raise RuntimeError("cannot merge into quantized base weights; serve the adapters unmerged (hooks)")
        self._saved_weights = {k: self.modules[k].weight.detach().clone() for k in keys}
        _add_deltas({k: self.modules[k].weight for k in keys}, [(self.adapters[n], w) for n, w in self.stack])
        self._merged_stack = self.stack

    @torch.no_grad()
    def unmerge(self):
        """Copy the saved original weights back: the base is restored exactly."""
        if self._merged_stack is None:
            return
        for k, w in self._saved_weights.items():
            self.modules[k].weight.copy_(w)
        self._saved_weights = None
        self._merged_stack = None

    def summary(self, name):
        ad = self.adapters[name]
        return {"name": name, "rank": ad.rank, "alpha": ad.alpha, "targets": list(ad.targets),
                "modules": len(ad.modules_), "trainable_params": ad.num_params(), "bytes": ad.num_bytes()}


def _add_deltas(weights, pairs):
    """weights {module key: tensor} += each (adapter, weight)'s weighted delta, in stack order: merge() and
    per_row's fold share it, so a folded stack equals a merged one bit for bit."""
    for ad, weight in pairs:
        for k, i in ad.index.items():
            w = weights[k]
            w.add_((ad.weight_delta(i) * weight).to(w.dtype))


def _version(ad):
    """Changes whenever any tensor of the adapter is changed in place (an optimizer step, a load): torch's
    per-tensor version counters only grow, so their sum does too."""
    try:
        return sum(p._version for p in ad._tensors)
    except RuntimeError:  # tensors made under torch.inference_mode() keep no version counter
        return None


def _now():
    return datetime.datetime.now().isoformat(timespec="seconds")
