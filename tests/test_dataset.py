"""nanochat.dataset: distributed shard iteration, and the online downloader against a local HTTP
server. No network; runs in a few seconds. (The offline builder: tests/test_offline.py.)"""
import http.server
import io
import os
import socket
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset as D

# -----------------------------------------------------------------------------
# iteration across ranks

def make_shards(data_dir, n_files=4, groups=(3, 1, 4, 2), rows_per_group=2):
    os.makedirs(data_dir, exist_ok=True)
    all_rows = []
    for f in range(n_files):
        path = os.path.join(data_dir, f"shard_{f:05d}.parquet")
        with pq.ParquetWriter(path, pa.schema([("text", pa.string()), ("source", pa.string())])) as w:
            rows = []
            for g in range(groups[f]):
                texts = [f"f{f}g{g}r{r}" for r in range(rows_per_group)]
                w.write_table(pa.table({"text": texts, "source": ["t"] * len(texts)}))
                rows += texts
        all_rows.append(rows)
    return all_rows


@pytest.mark.parametrize("world", [1, 2, 3, 5, 11])
def test_iteration_covers_split_once(tmp_path, world):
    data_dir = str(tmp_path / "d")
    rows = make_shards(data_dir)
    train = [r for f in rows[:-1] for r in f]
    for split, expected in (("train", train), ("val", rows[-1])):
        seen = []
        for rank in range(world):
            for batch in D.parquets_iter_batched(split, start=rank, step=world, data_dir=data_dir):
                assert batch  # one row group
                seen += batch
        assert sorted(seen) == sorted(expected)  # every row exactly once, nothing from the other split


def test_iteration_without_shards_says_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m nanochat.offline"):
        next(D.parquets_iter_batched("train", data_dir=str(tmp_path / "empty")))
    assert D.list_parquet_files(str(tmp_path / "empty")) == []


# -----------------------------------------------------------------------------
# online downloader against a local server

def parquet_bytes(n=50):
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [f"doc {i} " * 20 for i in range(n)]}), buf)
    return buf.getvalue()


class Handler(http.server.BaseHTTPRequestHandler):
    # per-server state lives on self.server: payload, fail_first, calls, ranges
    def log_message(self, *a):
        pass

    def _serve(self, head_only):
        srv = self.server
        srv.calls += 1
        if srv.fail_first > 0 and not head_only:
            srv.fail_first -= 1
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = srv.payload
        rng = self.headers.get("Range")
        srv.ranges.append(rng)
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            body = data[start:]
        else:
            self.send_response(200)
            body = data
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def do_GET(self):
        self._serve(False)

    def do_HEAD(self):
        self._serve(True)


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.payload, srv.fail_first, srv.calls, srv.ranges = parquet_bytes(), 0, 0, []
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def test_download_complete_and_skip(server, tmp_path):
    d = str(tmp_path)
    p = D.download_shard(3, d, base_url=server.url, backoff=0.01)
    assert p == os.path.join(d, "shard_00003.parquet")
    assert open(p, "rb").read() == server.payload
    assert not os.path.exists(p + ".part")
    calls = server.calls
    assert D.download_shard(3, d, base_url=server.url, backoff=0.01) == p  # complete: skipped
    assert server.calls == calls


def test_download_resumes_partial_file(server, tmp_path):
    d = str(tmp_path)
    final = os.path.join(d, "shard_00000.parquet")
    with open(final + ".part", "wb") as f:
        f.write(server.payload[:1000])
    assert D.download_shard(0, d, base_url=server.url, backoff=0.01) == final
    assert server.ranges == ["bytes=1000-"]
    assert open(final, "rb").read() == server.payload


def test_download_retries_after_failure(server, tmp_path):
    server.fail_first = 2
    p = D.download_shard(1, str(tmp_path), base_url=server.url, retries=4, backoff=0.01)
    assert p and open(p, "rb").read() == server.payload
    assert server.calls == 3


def test_download_rejects_corrupt_file(server, tmp_path):
    server.payload = b"this is not a parquet file" * 100
    p = D.download_shard(2, str(tmp_path), base_url=server.url, retries=2, backoff=0.01)
    assert p is None
    assert os.listdir(tmp_path) == []  # nothing renamed into place, no part left behind


def test_download_many_with_val_shard(server, tmp_path, monkeypatch):
    paths = D.download(2, workers=2, base_url=server.url, data_dir=str(tmp_path), backoff=0.01)
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["shard_00000.parquet", "shard_00001.parquet", f"shard_{D.MAX_SHARD:05d}.parquet"]
    val = [t for b in D.parquets_iter_batched("val", data_dir=str(tmp_path)) for t in b]
    assert len(val) == 50


def test_download_unreachable_fails_fast(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    t0 = time.time()
    with pytest.raises(RuntimeError, match="python -m nanochat.offline"):
        D.download(2, base_url=f"http://127.0.0.1:{port}", data_dir=str(tmp_path))
    assert time.time() - t0 < 10
    assert D.main(["-n", "1", "--base-url", f"http://127.0.0.1:{port}", "--data-dir", str(tmp_path)]) == 1


def test_download_climbmix_and_sources_do_not_mix(server, tmp_path):
    """--source climbmix fetches its own last shard as validation and records the source; FineWeb-Edu shards
    into the same folder (or ClimbMix into a folder of FineWeb-Edu shards) are refused by name."""
    climb = tmp_path / "climb"
    paths = D.download(1, base_url=server.url, data_dir=str(climb), backoff=0.01, source="climbmix")
    assert sorted(os.path.basename(p) for p in paths) == ["shard_00000.parquet", "shard_06542.parquet"]
    assert (climb / D.SOURCE_FILE).read_text() == "climbmix\n"
    with pytest.raises(RuntimeError, match="holds climbmix shards; fineweb-edu shards would mix"):
        D.download(1, base_url=server.url, data_dir=str(climb), backoff=0.01)
    old = tmp_path / "old"  # shards from before the _SOURCE record: FineWeb-Edu
    make_shards(str(old), n_files=2)
    with pytest.raises(RuntimeError, match="holds fineweb-edu shards; climbmix shards would mix"):
        D.download(1, base_url=server.url, data_dir=str(old), backoff=0.01, source="climbmix")
    with pytest.raises(ValueError, match="unknown data source 'c4'"):
        D.download(1, data_dir=str(tmp_path / "x"), source="c4")
