"""A local stand-in for the Hugging Face Hub's upload endpoints, driven by the real
huggingface_hub client through HF_ENDPOINT.

It speaks what huggingface_hub 2.4's `create_repo` + `upload_folder` send and expect (read from
its source: hf_api.py, _commit_api.py, lfs.py) on the git-LFS path, the one the client takes
when hf_xet is disabled (HF_HUB_DISABLE_XET=1; the Xet protocol's chunk store is not faked):

- POST /api/repos/create {name, organization, visibility, type} -> {"url": ...}; 409 if it exists
- POST /api/validate-yaml {content, repoType} -> {"warnings": []}; 400 on front matter that is
  not YAML
- POST /api/models/{repo}/preupload/{rev} {files: [{path, sample, size}]} ->
  {files: [{path, uploadMode: lfs|regular, shouldIgnore, oid?}]}
- POST /{repo}.git/info/lfs/objects/batch {operation, transfers, objects, hash_algo} ->
  {transfer: "basic", objects: [{oid, size, actions: {upload: {href}, verify: {href}}}]}
  (no actions for an object already stored)
- PUT the upload href with the bytes (checked against the oid), POST verify {oid, size}
- POST /api/models/{repo}/commit/{rev} (ndjson: header, file, lfsFile) ->
  {commitUrl, commitOid}

Every call needs `Authorization: Bearer <token>`, else 401 as the Hub answers. Files land in
`root/<org>/<name>/`; what was asked is kept in `calls` for the tests.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

TOKEN = "hf_fakehubtoken0123456789abcdef"
LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores larger files (and binaries) through LFS


@dataclass
class HubState:
    root: Path
    repos: dict[str, dict[str, Any]] = field(default_factory=dict)
    objects: dict[str, Path] = field(default_factory=dict)  # LFS oid -> stored bytes
    calls: list[tuple[str, str]] = field(default_factory=list)
    auth_seen: list[str | None] = field(default_factory=list)  # Authorization of each call
    lock: threading.Lock = field(default_factory=threading.Lock)

    def repo_dir(self, repo: str) -> Path:
        return self.root / "repos" / repo


class FakeHub:
    def __init__(self, root: Path) -> None:
        self.state = HubState(root)
        (root / "lfs").mkdir(parents=True, exist_ok=True)
        state = self.state

        class Handler(_Handler):
            hub = state

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    hub: HubState
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _answer(self, status: int, body: Any = None) -> None:
        data = json.dumps(body if body is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status >= 400:  # huggingface_hub reads the reason from this header
            self.send_header("X-Error-Message", str((body or {}).get("error", "")))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _authorized(self) -> bool:
        with self.hub.lock:
            self.hub.auth_seen.append(self.headers.get("Authorization"))
        if self.headers.get("Authorization") == f"Bearer {TOKEN}":
            return True
        self._body()
        self._answer(401, {"error": "Invalid credentials in Authorization header"})
        return False

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        with self.hub.lock:
            self.hub.calls.append(("POST", path))
        if not self._authorized():
            return
        body = self._body()
        if path == "/api/repos/create":
            return self._create(json.loads(body))
        if path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path):
            return self._preupload(m.group(1), json.loads(body))
        if m := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path):
            return self._lfs_batch(m.group(1), json.loads(body))
        if m := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/verify", path):
            return self._lfs_verify(json.loads(body))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path):
            return self._commit(m.group(1), body)
        self._answer(404, {"error": f"no route {path}"})

    def do_PUT(self) -> None:
        path = urlsplit(self.path).path
        with self.hub.lock:
            self.hub.calls.append(("PUT", path))
        m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)
        if m is None:
            self._body()
            return self._answer(404, {"error": f"no route {path}"})
        # Like S3's pre-signed URL: no Authorization header is sent here, the href is the key.
        data = self._body()
        oid = m.group(1)
        if hashlib.sha256(data).hexdigest() != oid:
            return self._answer(400, {"error": "content does not match its sha256"})
        stored = self.hub.root / "lfs" / oid
        stored.write_bytes(data)
        with self.hub.lock:
            self.hub.objects[oid] = stored
        self._answer(200, {})

    def _create(self, payload: dict[str, Any]) -> None:
        repo = f"{payload.get('organization') or 'user'}/{payload['name']}"
        with self.hub.lock:
            if repo in self.hub.repos:
                # The Hub's conflict answer carries the URL too (create_repo(exist_ok) reads it).
                return self._answer(
                    409,
                    {
                        "error": "You already created this model repo",
                        "url": f"{self._base()}/{repo}",
                    },
                )
            self.hub.repos[repo] = {"visibility": payload.get("visibility"), "commits": []}
        self.hub.repo_dir(repo).mkdir(parents=True, exist_ok=True)
        self._answer(200, {"url": f"{self._base()}/{repo}", "name": repo})

    def _validate_yaml(self, payload: dict[str, Any]) -> None:
        content = payload.get("content", "")
        m = re.match(r"---\n(.*?)\n---\n", content, re.S)
        try:
            meta = yaml.safe_load(m.group(1)) if m else None
        except yaml.YAMLError as exc:
            return self._answer(400, {"error": f"Invalid YAML in README.md: {exc}"})
        warnings = [] if meta else [{"message": "empty or missing yaml metadata in repo card"}]
        self._answer(200, {"errors": [], "warnings": warnings})

    def _known(self, repo: str) -> bool:
        if repo in self.hub.repos:
            return True
        self._answer(404, {"error": "Repository not found"})
        return False

    def _preupload(self, repo: str, payload: dict[str, Any]) -> None:
        if not self._known(repo):
            return
        files = []
        for f in payload["files"]:
            sample = base64.b64decode(f["sample"])
            binary = b"\0" in sample
            mode = "lfs" if binary or f["size"] >= LFS_THRESHOLD else "regular"
            files.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False})
        self._answer(200, {"files": files, "commitOid": "0" * 40})

    def _lfs_batch(self, repo: str, payload: dict[str, Any]) -> None:
        if not self._known(repo):
            return
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", []):
            return self._answer(422, {"error": "unsupported operation or transfer"})
        objects = []
        for obj in payload["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.hub.objects:
                entry["actions"] = {
                    "upload": {"href": f"{self._base()}/lfs-upload/{obj['oid']}"},
                    "verify": {"href": f"{self._base()}/{repo}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        self._answer(200, {"transfer": "basic", "objects": objects})

    def _lfs_verify(self, payload: dict[str, Any]) -> None:
        stored = self.hub.objects.get(payload["oid"])
        if stored is None or stored.stat().st_size != payload["size"]:
            return self._answer(404, {"error": "object not found or wrong size"})
        self._answer(200, {})

    def _commit(self, repo: str, body: bytes) -> None:
        if not self._known(repo):
            return
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return self._answer(400, {"error": "the first line must be the header"})
        target = self.hub.repo_dir(repo)
        written = []
        for line in lines[1:]:
            value = line["value"]
            dest = target / value["path"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            if line["key"] == "file":
                dest.write_bytes(base64.b64decode(value["content"]))
            elif line["key"] == "lfsFile":
                stored = self.hub.objects.get(value["oid"])
                if stored is None:
                    return self._answer(400, {"error": f"lfs object {value['oid']} not uploaded"})
                dest.write_bytes(stored.read_bytes())
            else:
                return self._answer(400, {"error": f"unsupported operation {line['key']}"})
            written.append(value["path"])
        oid = hashlib.sha1(body).hexdigest()
        with self.hub.lock:
            self.hub.repos[repo]["commits"].append(
                {"oid": oid, "summary": lines[0]["value"].get("summary"), "files": written}
            )
        self._answer(200, {"commitUrl": f"{self._base()}/{repo}/commit/{oid}", "commitOid": oid})

    def _base(self) -> str:
        return f"http://{self.headers.get('Host')}"
