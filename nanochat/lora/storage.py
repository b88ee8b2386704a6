"""Adapters on disk: saving, loading (checked against the base they were trained on), listing and deleting
them under $NANOCHAT_BASE_DIR/adapters/; what an adapter is and how it applies is nanochat/lora/adapter.py's job.

    save_adapter(lora, "facts", adapter_path("facts"), task="facts", metrics={...})
    load_adapter(lora, adapter_path("facts"))   # refuses an adapter trained on another base

On disk (one directory per adapter, e.g. $NANOCHAT_BASE_DIR/adapters/<name>/):
    adapter.safetensors   "<module>.lora_A", "<module>.lora_B" (+ "router.centroid", "router.keys" and
                          "router.general_keys" when set: nanochat/lora/router.py)
    adapter.json          name, rank, alpha, targets, modules, base_hash, task, metrics, created,
                          trainable_params, bytes, dtype, provenance, anchors (the router's words)
    examples.json         (optional) the conversations it was trained on: live learning's "add" mode trains
                          on them again beside new ones (read_examples)
written into a temp directory beside it and renamed into place. Loading reads them as regular files only (no
symlink, FIFO or device; size and JSON nesting bounded) and refuses NaN, inf or absurd values (check_values).
"""
import errno
import json
import os
import re
import shutil
import stat
import tempfile
import time

import safetensors.torch
import torch

from nanochat.common import get_base_dir, json_default
from nanochat.lora.adapter import _NAME_RE, AdapterBaseMismatch, _now, validate_name
from nanochat.lora.router import MAX_ANCHORS, MAX_GENERAL_KEYS, MAX_KEYS, STEM

FORMAT = "nanochat-lora"
FORMAT_VERSION = 1


def adapters_dir():
    """Where live adapters persist: $NANOCHAT_BASE_DIR/adapters/."""
    return os.path.join(get_base_dir(), "adapters")


def adapter_path(name, root=None):
    return os.path.join(root or adapters_dir(), validate_name(name))


def save_adapter(lora, name, directory, task=None, metrics=None, examples=None):
    """Write adapter `name` to `directory` (adapter.safetensors + adapter.json, and examples.json when
    `examples`, a list of conversations, is given). Everything goes into a temp directory beside it first and
    is renamed into place, replacing an older version."""
    ad = lora.adapters[name]
    if task is not None:
        ad.info["task"] = task
    if metrics is not None:
        ad.info["metrics"] = dict(metrics)
    tensors = {}
    for k, i in ad.index.items():
        tensors[f"{k}.lora_A"] = ad.A[i].detach().to("cpu").contiguous()
        tensors[f"{k}.lora_B"] = ad.B[i].detach().to("cpu").contiguous()
    for key, t in _router_tensors(ad):
        tensors[key] = t.detach().to("cpu", torch.float32).contiguous()
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION, "name": name, "rank": ad.rank, "alpha": ad.alpha,
        "targets": list(ad.targets), "modules": list(ad.modules_), "base_hash": lora.base_hash,
        "task": ad.info.get("task"), "metrics": ad.info.get("metrics", {}), "created": ad.info.get("created") or _now(),
        "saved": _now(), "trainable_params": ad.num_params(), "bytes": ad.num_bytes(),
        "dtype": str(ad.A[0].dtype).removeprefix("torch."), "router": ad.centroid is not None,
        "provenance": ad.info.get("provenance"),  # how a merged or nested adapter came about, else None
        "anchors": None if ad.anchors is None else sorted(ad.anchors),
    }
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}.", suffix=".tmp")
    try:
        safetensors.torch.save_file(tensors, os.path.join(tmp, "adapter.safetensors"),
                                    metadata={"format": "pt", "name": name})
        with open(os.path.join(tmp, "adapter.json"), "w") as f:
            json.dump(meta, f, indent=2, default=json_default)
        files = ["adapter.safetensors", "adapter.json"]
        if examples is not None:
            with open(os.path.join(tmp, "examples.json"), "w") as f:
                json.dump(examples, f)
            files.append("examples.json")
        for fn in files:
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


# Trained adapters hold values of order 1 (A starts within 1/sqrt(in), an optimizer step moves a value by about lr);
# one far beyond this is a corrupt file or a diverged run, and a forward through it overflows
MAX_ADAPTER_VALUE = 1e4


def check_values(ad):
    """Raise ValueError naming the first tensor of adapter `ad` holding NaN, inf, or a value beyond
    MAX_ADAPTER_VALUE (its router centroid: NaN or inf): such an adapter must not serve."""
    named = [(f"{k}.lora_{kind}", t[i]) for kind, t in (("A", ad.A), ("B", ad.B)) for k, i in ad.index.items()]
    for name, t in named + _router_tensors(ad):
        peak = float(t.detach().abs().amax()) if t.numel() else 0.0
        if peak != peak or peak == float("inf"):
            raise ValueError(f"adapter {ad.name!r}: {name} holds NaN or infinite values (a corrupt file or a "
                             "diverged training run), so it cannot serve")
        if not name.startswith("router.") and peak > MAX_ADAPTER_VALUE:
            raise ValueError(f"adapter {ad.name!r}: {name} holds a value of {peak:.3g}; trained adapters stay far "
                             f"below {MAX_ADAPTER_VALUE:g} (a corrupt file or a diverged training run), so it cannot "
                             "serve")


def _router_tensors(ad):
    """[(file key, tensor)] of the router data an adapter holds (nanochat/lora/router.py)."""
    pairs = (("router.centroid", ad.centroid), ("router.keys", ad.keys), ("router.general_keys", ad.general_keys))
    return [(k, t) for k, t in pairs if t is not None]


MAX_RANK = 1024  # far above any useful adapter; a bigger rank in adapter.json is corruption, not a choice
MAX_ROUTER_ROWS = MAX_KEYS + MAX_GENERAL_KEYS  # router keys in one file: what router.set_keys keeps at most
MAX_EXAMPLES_BYTES = 64 << 20  # examples.json: what "add" mode trains on again; far above the request limits
MAX_JSON_BYTES = 1 << 20  # adapter.json and .active.json are a few KB
MAX_JSON_DEPTH = 32  # adapter.json nests 4 levels; Python's parser (and FastAPI's encoder) recurse once per level
_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def read_regular_file(path, max_bytes):
    """The bytes of `path`, a regular file of at most max_bytes. Opened without following a symlink and without
    blocking, so a FIFO or device found in the adapters directory can neither hang the server nor feed it
    forever. Raises FileNotFoundError when nothing is there, ValueError saying what is there instead."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValueError(f"{path} is a symbolic link; adapter files must be regular files") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "not a file")
            raise ValueError(f"{path} is {kind}, not a regular file: remove it, or save the adapter again")
        if st.st_size > max_bytes:
            raise ValueError(f"{path} is {st.st_size} bytes; the most it can be is {max_bytes}")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise ValueError(f"{path} grew past {max_bytes} bytes while it was read")
    return data


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def json_too_deep(text, max_depth):
    """Whether the brackets of a JSON text (strings skipped) nest deeper than max_depth."""
    if text.count("[") + text.count("{") <= max_depth:
        return False
    depth = 0
    for m in re.finditer(r"[\[\]{}]", _JSON_STRING.sub("", text)):
        depth += 1 if m.group() in "[{" else -1
        if depth > max_depth:
            return True
    return False


def read_json(path, max_bytes=MAX_JSON_BYTES, max_depth=MAX_JSON_DEPTH):
    """A small JSON file read with read_regular_file's care and nesting at most max_depth deep (checked before
    parsing). Raises FileNotFoundError, or ValueError saying what is wrong."""
    try:
        text = read_regular_file(path, max_bytes).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if json_too_deep(text, max_depth):
        raise ValueError(f"{path} nests deeper than {max_depth} levels; no adapter file does")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def read_adapter_meta(directory):
    """adapter.json of the adapter at `directory`, checked field by field: raises FileNotFoundError when
    there is none and ValueError naming the first bad field (a hand-edited or corrupt file must not
    reach LoRA.add or torch with, say, a rank of -3 or a list for a dict)."""
    path = os.path.join(directory, "adapter.json")
    try:
        meta = read_json(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no adapter at {directory} (missing adapter.json)") from None
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
    anchors = meta.get("anchors")
    if anchors is not None and not (isinstance(anchors, list) and 0 < len(anchors) <= MAX_ANCHORS and all(
            isinstance(a, str) and 0 < len(a) <= STEM for a in anchors)):
        raise bad("anchors", f"null or a list of at most {MAX_ANCHORS} word stems of at most {STEM} characters")
    return meta


def load_adapter(lora, directory, name=None, activate=False, replace=False):
    """Load a saved adapter into `lora` (as `name`, default the saved name). Raises
    AdapterBaseMismatch when it was trained on a different base model, and ValueError for anything that makes it
    unusable: unreadable or oversized files, tensors that don't fit, NaN/inf or absurd values (check_values)."""
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
    # the most a file of this rank on these modules holds: 8 bytes a value (float64), plus room for the header
    limit = 8 * meta["rank"] * sum(lora.modules[k].in_features + lora.modules[k].out_features
                                   for k in set(meta["modules"])) + (1 << 20)
    limit += 8 * (MAX_ROUTER_ROWS + 1) * _hidden_size(lora)  # the router's keys and centroid
    try:
        data = read_regular_file(os.path.join(directory, "adapter.safetensors"), limit)
    except FileNotFoundError:
        raise ValueError(f"adapter {meta['name']!r}: adapter.safetensors is missing") from None
    try:  # a truncated or garbage file: safetensors raises its own error type
        tensors = safetensors.torch.load(data)
    except Exception as e:  # noqa: BLE001 - whatever the file is, the answer is "this adapter is unusable"
        raise ValueError(f"adapter {meta['name']!r}: adapter.safetensors is unreadable "
                         f"({type(e).__name__}: {e})") from None
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
    try:
        ad.centroid, ad.keys, ad.general_keys = _router_from(tensors, _hidden_size(lora), meta["name"])
        ad.anchors = None if meta.get("anchors") is None else frozenset(meta["anchors"])
        check_values(ad)
    except ValueError:
        lora.remove(name)
        raise
    ad.info = {"task": meta.get("task"), "metrics": meta.get("metrics", {}), "created": meta.get("created"),
               "provenance": meta.get("provenance")}
    if activate:
        lora.activate(name)
    return name


def _hidden_size(lora):
    return lora.model.transformer.wte.embedding_dim


def _router_from(tensors, width, name):
    """(centroid, keys, general_keys) of a loaded adapter's tensors, None for each one absent; raises ValueError
    for a shape that is not (width,) / (rows, width)."""
    out = []
    for key, dims in (("router.centroid", 1), ("router.keys", 2), ("router.general_keys", 2)):
        t = tensors.get(key)
        if t is not None and not (t.dim() == dims and t.shape[-1] == width and t.is_floating_point()
                                  and (dims == 1 or 0 < t.shape[0] <= MAX_ROUTER_ROWS)):
            raise ValueError(f"adapter {name!r}: {key} has shape {tuple(t.shape)} ({t.dtype}); this model's router "
                             f"needs {'(width,)' if dims == 1 else '(rows, width)'} floats with width {width}")
        out.append(None if t is None else t.float())
    return tuple(out)


def read_examples(directory):
    """The conversations saved with an adapter (examples.json), [] when it has none. A conversation is a list of
    {"role", "content"} dicts; anything else raises ValueError naming the file and what is wrong (whether the
    messages render is the tokenizer's to say)."""
    path = os.path.join(directory, "examples.json")
    try:
        data = read_json(path, max_bytes=MAX_EXAMPLES_BYTES, max_depth=8)
    except FileNotFoundError:
        return []
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of conversations")
    for i, conv in enumerate(data):
        if not isinstance(conv, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), (str, list)) for m in conv):
            raise ValueError(f"{path}: conversation {i} is not a list of {{\"role\", \"content\"}} messages")
    return data


def provenance_summary(provenance):
    """adapter.json's provenance -> what a listing shows: {"method", "merged_from": [{"name", "weight"}],
    "density"} for a merged adapter, {"stacked_on": [{"name", "weight"}]} for a nested one (serve it on top
    of that stack), None for a plain one. Whatever has the wrong type (a hand-edited file) is left out."""
    if not isinstance(provenance, dict):
        return None

    def pairs(items):
        if not isinstance(items, list):
            return None
        return [{"name": x["name"], "weight": x.get("weight", 1.0)} for x in items[:64]
                if isinstance(x, dict) and isinstance(x.get("name"), str) and len(x["name"]) <= 64
                and type(x.get("weight", 1.0)) in (int, float)]

    out = {}
    if pairs(provenance.get("merged_from")) is not None:
        out["merged_from"] = pairs(provenance["merged_from"])
        if isinstance(provenance.get("method"), str) and len(provenance["method"]) <= 16:
            out["method"] = provenance["method"]
        if type(provenance.get("density")) in (int, float):
            out["density"] = provenance["density"]
    if pairs(provenance.get("stacked_on")) is not None:
        out["stacked_on"] = pairs(provenance["stacked_on"])
    return out or None


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
