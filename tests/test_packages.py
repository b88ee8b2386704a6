"""nanochat.offline.packages: the one fetcher (download once, extract only what is asked, markers, locks, the
pip call) and the readers of the formats inside the packages.
The registry clients are faked: nothing is downloaded."""
import gzip
import io
import json
import os
import tarfile
import zipfile

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from nanochat.offline import packages as P

NPM = P.Package("npm", "nlp-corpus@4.4.0")


def _tgz(path, files):
    with tarfile.open(path, "w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


@pytest.fixture
def base(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "1")  # quiet
    return tmp_path


def test_fetch_extracts_only_needed_files_once(base, monkeypatch):
    """`npm pack` faked: it drops a tarball in the cwd, as the real one does."""
    calls = []

    def fake_run(cmd, cwd=None):
        calls.append(cmd)
        assert cmd[:2] == ["npm", "pack"] and cmd[-1] == "nlp-corpus@4.4.0"
        _tgz(os.path.join(cwd, "nlp-corpus-4.4.0.tgz"), {"package/builds/doc-0.json": b'["One sentence."]',
                                                         "package/big.bin": b"x" * 100})

    monkeypatch.setattr(P, "run", fake_run)
    root = P.fetch(NPM, ["package/builds/doc-*.json"])
    assert root == P.package_root(NPM) == str(base / "packages" / "nlp-corpus_4.4.0")
    assert open(os.path.join(root, "package/builds/doc-0.json")).read() == '["One sentence."]'
    assert not os.path.exists(os.path.join(root, "package/big.bin"))  # not asked for
    assert os.path.exists(P.done_marker(root, ["package/builds/doc-*.json"]))
    assert os.listdir(P.archive_dir(NPM)) == ["nlp-corpus-4.4.0.tgz"]  # the archive is kept, no temp folders
    assert sorted(os.listdir(base / "packages" / "archives")) == ["nlp-corpus_4.4.0"]
    assert P.fetch(NPM, ["package/builds/doc-*.json"]) == root and len(calls) == 1  # cached: no second download
    # new patterns come from the archive on disk, still without a download
    assert P.fetch_path(NPM, "package/big.bin") == os.path.join(root, "package/big.bin")
    assert len(calls) == 1 and os.path.getsize(os.path.join(root, "package/big.bin")) == 100
    with pytest.raises(FileNotFoundError, match=r"nlp-corpus-4.4.0.tgz has no file matching \['nope'\]"):
        P.fetch(NPM, ["nope"])


def test_fetch_path_of_a_wheel_folder_and_cache(base):
    """A wheel already in the archive folder: only the asked-for folder is extracted; once extracted,
    the wheel is not needed any more."""
    pkg = P.Package("pypi", "chitchat-dataset==0.9.0")
    d = P.archive_dir(pkg)
    os.makedirs(d)
    whl = os.path.join(d, "chitchat_dataset-0.9.0-py3-none-any.whl")
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("chitchat_dataset/dataset.json", "{}")
        z.writestr("chitchat_dataset/data/a.txt", "a")
        z.writestr("chitchat_dataset/__init__.py", "")
    p = P.fetch_path(pkg, "chitchat_dataset/dataset.json")
    assert open(p).read() == "{}"
    assert not os.path.exists(os.path.join(os.path.dirname(p), "__init__.py"))
    folder = P.fetch_path(pkg, "chitchat_dataset/data")
    assert os.listdir(folder) == ["a.txt"]
    os.remove(whl)  # cached: no wheel (and no pip) needed any more
    assert P.fetch_path(pkg, "chitchat_dataset/dataset.json") == p


def test_pip_download_is_one_call_with_hash_and_kind(base, monkeypatch):
    seen = []

    def fake_run(cmd, cwd=None):
        seen.append(cmd)
        req = cmd[cmd.index("-r") + 1]
        seen.append(open(req).read())
        open(os.path.join(cmd[cmd.index("-d") + 1], "x-1.0-py3-none-any.whl"), "wb").close()

    monkeypatch.setattr(P, "run", fake_run)
    P.pip_download(P.Package("pypi", "x==1.0", sha256="ab" * 32), str(base))
    cmd, req = seen
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "--require-hashes" in cmd
    assert cmd[cmd.index("--only-binary") + 1] == ":all:"
    assert req == f"x==1.0 --hash=sha256:{'ab' * 32}\n"
    seen.clear()
    P.pip_download(P.Package("pypi", "django==5.2.19", sdist=True), str(base))
    assert "--no-binary" in seen[0] and "--require-hashes" not in seen[0] and seen[1] == "django==5.2.19\n"


def test_failed_download_names_the_package_and_leaves_nothing(base, monkeypatch):
    def fail(cmd, cwd=None):
        raise RuntimeError(f"`{' '.join(cmd)}` failed (1):\nERROR: No matching distribution found")

    monkeypatch.setattr(P, "run", fail)
    monkeypatch.setattr(P.time, "sleep", lambda s: None)
    with pytest.raises(RuntimeError, match=r"(?s)pip download nope==1.0 failed \(PyPI access is needed once\).*No matching"):
        P.fetch_path(P.Package("pypi", "nope==1.0"), "x")
    assert os.listdir(base / "packages" / "archives") == []
    with pytest.raises(ValueError, match="unknown registry"):
        P.download(P.Package("conda", "x"))


def test_apt_batch_is_one_call_filed_per_package(base, monkeypatch):
    calls = []

    def fake_run(cmd, cwd=None):
        calls.append(cmd)
        for name in cmd[3:]:
            open(os.path.join(cwd, f"{name}_1.0_all.deb"), "wb").close()

    monkeypatch.setattr(P, "run", fake_run)
    pkgs = [P.Package("apt", "dict-gcide"), P.Package("apt", "fortunes"), NPM]
    P.download_apt_batch(pkgs)
    assert calls == [["apt-get", "download", "-q", "dict-gcide", "fortunes"]]
    assert os.listdir(P.archive_dir(pkgs[0])) == ["dict-gcide_1.0_all.deb"]
    assert os.listdir(P.archive_dir(pkgs[1])) == ["fortunes_1.0_all.deb"]
    P.download_apt_batch(pkgs)  # all on disk: no call
    assert len(calls) == 1 and sorted(os.listdir(base / "packages" / "archives")) == ["dict-gcide", "fortunes"]


# -----------------------------------------------------------------------------
# readers

def test_read_arrow_rows(tmp_path):
    table = pa.Table.from_pylist([{"q": "a", "choices": {"label": ["A", "B"]}}, {"q": "b", "choices": {"label": []}}])
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    p = tmp_path / "x.arrow"
    p.write_bytes(sink.getvalue().to_pybytes())
    assert P.read_arrow_rows(str(p)) == table.to_pylist()


def test_oe_eval_docs_once_each_in_order_and_cached(tmp_path):
    recs = []
    for offset in (0, 1_000_000):  # "rc" files repeat every doc as unconditioned requests
        for i, nid in enumerate(["Mercury_1", "MCAS_2"]):
            recs += [{"doc": {"id": nid, "k": offset}, "doc_id": i + offset, "native_id": nid, "idx": j} for j in range(3)]
    p = tmp_path / "r.jsonl.gz"
    p.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in recs).encode()))
    assert P.oe_eval_docs(str(p)) == [{"id": "Mercury_1", "k": 0}, {"id": "MCAS_2", "k": 0}]
    assert os.path.exists(str(p) + ".docs.jsonl")
    p.write_bytes(b"")  # the compact cache answers from now on
    assert [d["id"] for d in P.oe_eval_docs(str(p))] == ["Mercury_1", "MCAS_2"]
    # without native_id, doc_id tells documents apart
    q = tmp_path / "q.jsonl.gz"
    q.write_bytes(gzip.compress("".join(json.dumps({"doc": {"n": i // 2}, "doc_id": i // 2}) + "\n"
                                        for i in range(6)).encode()))
    assert P.oe_eval_docs(str(q)) == [{"n": 0}, {"n": 1}, {"n": 2}]
