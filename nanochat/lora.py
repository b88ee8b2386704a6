"""LoRA adapters on the GPT's block matrices: creating, stacking, merging into the weights, saving and
loading them; training them is nanochat/lora_train.py's job, combining them nanochat/lora_merge.py's.

    lora = LoRA(model)                          # hooks every target Linear, freezes the base
    lora.add("facts", rank=8, alpha=16)         # A random, B zero: the model is unchanged
    lora.activate("facts")                      # O(1): the hooks read `lora.stack`
    lora.activate(["domain", "facts"], weights=[1.0, 0.5])   # a stack: both apply, in order
    ... train lora.adapters["facts"].parameters() ...
    save_adapter(lora, "facts", adapter_path("facts"), task="facts", metrics={...})
    load_adapter(lora, adapter_path("facts"))   # refuses an adapter trained on another base
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

merge() folds the active stack into the weights (no extra matmuls at inference); it keeps a copy
of the original weights, and unmerge() copies them back, so the base is restored bit for bit
(subtracting B A again would leave rounding errors).

An adapter only makes sense on the weights it was trained on: LoRA records a hash of the base
model's state when it attaches (model_state_hash), saved adapters carry it in adapter.json, and
load_adapter raises AdapterBaseMismatch for a different base.

On disk (one directory per adapter, e.g. $NANOCHAT_BASE_DIR/adapters/<name>/):
    adapter.safetensors   "<module>.lora_A", "<module>.lora_B" (+ "router.centroid" when set)
    adapter.json          name, rank, alpha, targets, modules, base_hash, task, metrics, created,
                          trainable_params, bytes, dtype
written into a temp directory beside it and renamed into place.

Routing (task unknown at inference): each adapter may carry a centroid, the mean of the base
model's last-block hidden states over its training data; route(ids) picks the adapter whose
centroid is nearest (cosine) to the prompt's mean hidden state under the base model.
"""
import datetime
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import get_base_dir, json_default

DEFAULT_TARGETS = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
FORMAT = "nanochat-lora"
FORMAT_VERSION = 1
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


def adapters_dir():
    """Where live adapters persist: $NANOCHAT_BASE_DIR/adapters/."""
    return os.path.join(get_base_dir(), "adapters")


def adapter_path(name, root=None):
    return os.path.join(root or adapters_dir(), validate_name(name))


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
        self.A = nn.ParameterList([nn.Parameter(torch.empty(rank, fin, device=device, dtype=dtype)) for fout, fin in shapes])
        self.B = nn.ParameterList([nn.Parameter(torch.zeros(fout, rank, device=device, dtype=dtype)) for fout, fin in shapes])
        self.centroid = None  # router: mean base hidden state of the adapter's training data
        self.info = {}  # task, metrics, created: what goes into adapter.json
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
        n = sum(p.numel() * p.element_size() for p in self.parameters())
        if self.centroid is not None:
            n += self.centroid.numel() * self.centroid.element_size()
        return n


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
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        self._handles = [m.register_forward_hook(self._hook(k)) for k, m in self.modules.items()]
        model._lora = self  # a plain attribute: not a submodule, so the state_dict is unchanged

    def _hook(self, key):
        def hook(module, inputs, output):
            if not self._enabled or not self.stack or self._merged_stack is not None:
                return None
            return self.add_deltas(key, inputs[0], output, self.stack)
        return hook

    def add_deltas(self, key, x, output, stack):
        """output + the stack's terms for target module `key`: for each (name, weight) in order,
        weight * (alpha / r) * B A x (an adapter that does not target this module adds nothing). The
        hook calls it for the whole batch; applying a different stack to some rows is a call per group."""
        for name, weight in stack:
            ad = self.adapters[name]
            i = ad.index.get(key)
            if i is not None:
                d = ad.delta(i, x)
                output = output + (d if weight == 1.0 else d * weight).to(output.dtype)
        return output

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
        shapes = [tuple(self.modules[k].weight.shape) for k in keys]
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
        del self.adapters[name]

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
        self.stack = stack
        if merge and stack and self._merged_stack != stack:
            self.merge()

    def freeze(self, name, frozen=True):
        """Stop (or restart) gradients into adapter `name`: what sits beneath a nested adapter is frozen."""
        self.adapters[name].requires_grad_(not frozen)

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
        if any(self.modules[k].weight.dtype not in (torch.float32, torch.bfloat16, torch.float16) for k in keys):
            raise RuntimeError("cannot merge into quantized base weights; serve the adapters unmerged (hooks)")
        self._saved_weights = {k: self.modules[k].weight.detach().clone() for k in keys}
        for name, weight in self.stack:
            ad = self.adapters[name]
            for k, i in ad.index.items():
                w = self.modules[k].weight
                w.add_((ad.weight_delta(i) * weight).to(w.dtype))
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

    def trainable_parameters(self, name):
        return list(self.adapters[name].parameters())

    def summary(self, name):
        ad = self.adapters[name]
        return {"name": name, "rank": ad.rank, "alpha": ad.alpha, "targets": list(ad.targets),
                "modules": len(ad.modules_), "trainable_params": ad.num_params(), "bytes": ad.num_bytes()}

    # --- routing ----------------------------------------------------------------------------
    @torch.no_grad()
    def hidden_means(self, ids_list, batch_size=16):
        """(n, n_embd): for each token list, the mean over its positions of the base model's
        RMS-normed last-block output (what the lm_head reads)."""
        model = self.model
        device = model.get_device()
        captured = {}
        handle = model.transformer.h[-1].register_forward_hook(lambda m, i, o: captured.__setitem__("h", o))
        out = []
        try:
            with self.base_only():
                for b in range(0, len(ids_list), batch_size):
                    chunk = [list(ids)[:model.config.sequence_len] for ids in ids_list[b:b + batch_size]]
                    L = max(len(c) for c in chunk)
                    x = torch.zeros((len(chunk), L), dtype=torch.long, device=device)
                    valid = torch.zeros((len(chunk), L, 1), dtype=torch.float32, device=device)
                    for r, c in enumerate(chunk):
                        x[r, :len(c)] = torch.tensor(c, dtype=torch.long)
                        valid[r, :len(c)] = 1.0
                    model(x)
                    h = F.rms_norm(captured["h"].float(), (captured["h"].size(-1),))
                    out.append((h * valid).sum(1) / valid.sum(1))
        finally:
            handle.remove()
        return torch.cat(out).cpu()

    def set_centroid(self, name, ids_list):
        """The adapter's router centroid: the mean of hidden_means over examples of its task."""
        self.adapters[name].centroid = self.hidden_means(ids_list).mean(0)
        return self.adapters[name].centroid

    def route(self, ids_list, candidates=None):
        """For each token list, the name of the candidate adapter (default: all with a centroid)
        whose centroid is nearest by cosine similarity to its base hidden mean."""
        names = [n for n in (candidates or self.adapters) if self.adapters[n].centroid is not None]
        if not names:
            raise RuntimeError("no adapter has a router centroid (set_centroid after training)")
        cents = F.normalize(torch.stack([self.adapters[n].centroid.float().cpu() for n in names]), dim=-1)
        h = F.normalize(self.hidden_means(ids_list), dim=-1)
        return [names[i] for i in (h @ cents.T).argmax(dim=1).tolist()]


def _now():
    return datetime.datetime.now().isoformat(timespec="seconds")


# --- save / load ----------------------------------------------------------------------------

def save_adapter(lora, name, directory, task=None, metrics=None):
    """Write adapter `name` to `directory` (adapter.safetensors + adapter.json). Everything goes into a
    temp directory beside it first and is renamed into place, replacing an older version."""
    from safetensors.torch import save_file
    ad = lora.adapters[name]
    if task is not None:
        ad.info["task"] = task
    if metrics is not None:
        ad.info["metrics"] = dict(metrics)
    tensors = {}
    for k, i in ad.index.items():
        tensors[f"{k}.lora_A"] = ad.A[i].detach().to("cpu").contiguous()
        tensors[f"{k}.lora_B"] = ad.B[i].detach().to("cpu").contiguous()
    if ad.centroid is not None:
        tensors["router.centroid"] = ad.centroid.detach().to("cpu", torch.float32).contiguous()
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION, "name": name, "rank": ad.rank, "alpha": ad.alpha,
        "targets": list(ad.targets), "modules": list(ad.modules_), "base_hash": lora.base_hash,
        "task": ad.info.get("task"), "metrics": ad.info.get("metrics", {}), "created": ad.info.get("created") or _now(),
        "saved": _now(), "trainable_params": ad.num_params(), "bytes": ad.num_bytes(),
        "dtype": str(ad.A[0].dtype).removeprefix("torch."), "router": ad.centroid is not None,
        "provenance": ad.info.get("provenance"),  # how a merged or nested adapter came about, else None
    }
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}.", suffix=".tmp")
    try:
        save_file(tensors, os.path.join(tmp, "adapter.safetensors"), metadata={"format": "pt", "name": name})
        with open(os.path.join(tmp, "adapter.json"), "w") as f:
            json.dump(meta, f, indent=2, default=json_default)
        for fn in ("adapter.safetensors", "adapter.json"):
            with open(os.path.join(tmp, fn), "rb") as f:
                os.fsync(f.fileno())
        if os.path.exists(directory):
            # a directory cannot be replaced in one rename: move the old one aside first
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}.", suffix=".old")
            os.rmdir(old)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


MAX_RANK = 1024  # far above any useful adapter; a bigger rank in adapter.json is corruption, not a choice


def read_adapter_meta(directory):
    """adapter.json of the adapter at `directory`, checked field by field: raises FileNotFoundError when
    there is none and ValueError naming the first bad field (a hand-edited or corrupt file must not
    reach LoRA.add or torch with, say, a rank of -3 or a list for a dict)."""
    path = os.path.join(directory, "adapter.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no adapter at {directory} (missing adapter.json)")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} adapter")

    def bad(field, want):
        return ValueError(f"{path}: {field} must be {want}, got {meta.get(field)!r}"[:300])

    if not isinstance(meta.get("name"), str) or not _NAME_RE.fullmatch(meta["name"]):
        raise bad("name", "an adapter name")
    rank = meta.get("rank")
    if type(rank) is not int or not 1 <= rank <= MAX_RANK:
        raise bad("rank", f"an integer from 1 to {MAX_RANK}")
    alpha = meta.get("alpha")
    if type(alpha) not in (int, float) or not 0 < alpha < 1e6:
        raise bad("alpha", "a positive number")
    for field in ("targets", "modules"):
        if not isinstance(meta.get(field), list) or not all(isinstance(x, str) for x in meta[field]):
            raise bad(field, "a list of module names")
    if not isinstance(meta.get("base_hash"), str):
        raise bad("base_hash", "a string")
    if not isinstance(meta.get("metrics", {}), dict):
        raise bad("metrics", "an object")
    return meta


def load_adapter(lora, directory, name=None, activate=False, replace=False):
    """Load a saved adapter into `lora` (as `name`, default the saved name). Raises
    AdapterBaseMismatch when it was trained on a different base model."""
    from safetensors.torch import load_file
    meta = read_adapter_meta(directory)
    if meta["base_hash"] != lora.base_hash:
        raise AdapterBaseMismatch(
            f"adapter {meta['name']!r} at {directory} was trained on base model {meta['base_hash']} but this model "
            f"is {lora.base_hash}: an adapter only works on the exact weights it was trained on. Load the "
            f"checkpoint it came from, or train the adapter again on this model.")
    name = name or meta["name"]
    if name in lora.adapters:
        if not replace:
            raise ValueError(f"adapter {name!r} is already loaded (pass replace=True to reload it)")
        lora.remove(name)
    missing = [k for k in meta["modules"] if k not in lora.modules]
    if missing:
        raise ValueError(f"adapter {meta['name']!r} targets modules this model does not hook: {missing[:4]}")
    try:  # a truncated or garbage file: safetensors raises its own error type, or OSError
        tensors = load_file(os.path.join(directory, "adapter.safetensors"), device=str(lora.model.get_device()))
    except Exception as e:  # noqa: BLE001 - whatever the file is, the answer is "this adapter is unusable"
        raise ValueError(f"adapter {meta['name']!r}: adapter.safetensors is unreadable ({type(e).__name__}: {e})") from None
    ad = lora.add(name, rank=meta["rank"], alpha=meta["alpha"], targets=meta["targets"])
    if ad.modules_ != meta["modules"]:
        lora.remove(name)
        raise ValueError(f"adapter {meta['name']!r}: its module list does not match this model's layers")
    with torch.no_grad():
        for k, i in ad.index.items():
            for kind, params in (("lora_A", ad.A), ("lora_B", ad.B)):
                t = tensors.get(f"{k}.{kind}")
                if t is None or t.shape != params[i].shape:
                    lora.remove(name)
                    have = "is missing" if t is None else f"has shape {tuple(t.shape)}"
                    raise ValueError(f"adapter {meta['name']!r}: {k}.{kind} {have}, "
                                     f"this model needs {tuple(params[i].shape)}")
                params[i].copy_(t)
    ad.centroid = tensors.get("router.centroid")
    if ad.centroid is not None:
        ad.centroid = ad.centroid.cpu()
    ad.info = {"task": meta.get("task"), "metrics": meta.get("metrics", {}), "created": meta.get("created"),
               "provenance": meta.get("provenance")}
    if activate:
        lora.activate(name)
    return name


def list_adapters(root=None, errors=None):
    """The adapter.json of every saved adapter under root (default $NANOCHAT_BASE_DIR/adapters).
    Directories whose adapter.json is missing or bad are left out; pass a dict as `errors` to get
    {directory name: why} for them."""
    root = root or adapters_dir()
    if not os.path.isdir(root):
        return []
    out = []
    for d in sorted(os.listdir(root)):
        if d.startswith("."):
            continue  # temp or old directories of an unfinished save
        try:
            out.append(read_adapter_meta(os.path.join(root, d)))
        except (OSError, ValueError) as e:
            if errors is not None:
                errors[d] = str(e)
    return out


def remove_stale_temp(root):
    """Delete what an interrupted save or delete left under root (.<name>.*.tmp / .old / .deleted-*
    directories, .<file>.*.tmp files): call when nothing is saving there. -> the names removed."""
    if not os.path.isdir(root):
        return []
    stale = re.compile(r"\..+(\.tmp|\.old|\.deleted-\d+)$")
    removed = []
    for d in sorted(os.listdir(root)):
        m = re.fullmatch(r"\.(.+)\.[^.]+\.old", d)
        if m and os.path.isdir(os.path.join(root, d)) and not os.path.exists(os.path.join(root, m.group(1))):
            os.replace(os.path.join(root, d), os.path.join(root, m.group(1)))  # a replace cut short: keep the old one
            continue
        if stale.fullmatch(d):
            p = os.path.join(root, d)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.remove(p)
            removed.append(d)
    return sorted(removed)


def delete_adapter(directory):
    """Remove a saved adapter: renamed away first, so a reader never sees half a directory."""
    directory = os.path.abspath(directory)
    read_adapter_meta(directory)  # refuse to delete something that is not an adapter
    parent, base = os.path.split(directory.rstrip("/"))
    gone = os.path.join(parent, f".{base}.deleted-{time.time_ns()}")
    os.replace(directory, gone)
    shutil.rmtree(gone, ignore_errors=True)
