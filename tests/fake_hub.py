"""A tiny local stand-in for the HuggingFace hub, enough for huggingface_hub.snapshot_download
(repo info, tree listing, file HEAD/GET with Range). Tests point HF_ENDPOINT at it.

    with FakeHub({"openai/gsm8k": {"main/train-00000-of-00001.parquet": b"..."}}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
"""
import hashlib
import http.server
import json
import threading
from urllib.parse import unquote, urlparse

SHA = "0123456789abcdef0123456789abcdef01234567"


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _json(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _missing(self):
        self.send_response(404)
        self.send_header("X-Error-Code", "EntryNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _serve(self, head_only):
        hub = self.server.hub
        hub.requests.append((self.command, self.path))
        parts = [unquote(p) for p in urlparse(self.path).path.strip("/").split("/")]
        if parts[:2] == ["api", "datasets"] and len(parts) >= 6:  # api/datasets/<org>/<name>/<kind>/<rev>[/path]
            files = hub.repos.get(f"{parts[2]}/{parts[3]}")
            if files is None:
                return self._missing()
            if parts[4] == "revision":
                return self._json({"id": f"{parts[2]}/{parts[3]}", "sha": SHA, "private": False,
                                   "siblings": [{"rfilename": f} for f in sorted(files)]})
            if parts[4] == "tree":
                return self._json([{"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                                   for f, d in sorted(files.items())])
        # datasets/<org>/<name>/resolve/<rev>/path
        if parts[:1] == ["datasets"] and len(parts) >= 6 and parts[3] == "resolve":
            data = hub.repos.get(f"{parts[1]}/{parts[2]}", {}).get("/".join(parts[5:]))
            if data is None:
                return self._missing()
            start = 0
            rng = self.headers.get("Range")
            if rng and not head_only:
                start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", SHA)
            self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            if not head_only:
                self.wfile.write(data[start:])
            return
        self._missing()

    def do_GET(self):
        self._serve(False)

    def do_HEAD(self):
        self._serve(True)


class FakeHub:
    """repos: {"org/name": {"path/in/repo": bytes}}; .requests lists (method, path) of every request."""

    def __init__(self, repos):
        self.repos = repos
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.hub = self
        self.requests = []
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
