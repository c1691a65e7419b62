"""`push_to_hub` / hub loading of PAD checkpoints against a local HTTP stand-in of the Hub.

No hub is reachable here, so a small threaded HTTP server implements the endpoints that
`huggingface_hub` calls for an upload (create repo, validate README metadata, preupload, LFS batch +
PUT, commit) and for a download (resolve, revision info). The client side is unmodified: the tests
only point `huggingface_hub` at the stand-in (the values behind the `HF_ENDPOINT` and
`HF_HUB_DISABLE_XET` environment variables; with Xet disabled, LFS files take the legacy LFS path).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import pytest
import torch
import transformers.utils.hub as transformers_hub
import yaml
from huggingface_hub import ModelCard, constants as hf_constants
from safetensors.torch import load as load_safetensors_bytes
from transformers import AutoModelForSequenceClassification

from conftest import random_batch
from pad_moe_transformers import checkpoint as ckpt
from test_checkpoint import assert_same_module, make_model, outputs

# huggingface_hub's own LFS PUT passes `data=`, which its HTTP client deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

REPO = "pad-user/tiny-pad"
TOKEN = "hf_standin_token"
# Best-effort client telemetry (huggingface_hub's agent detection), not part of the upload/download API.
IGNORED = {"/api/agent-harnesses"}


class StandInHub:
    """In-memory Hub: repos of committed files, LFS objects, and a log of every request."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, str] = {}  # repo -> last commit oid
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.unhandled: list[str] = []
        self.commit_payloads: list[list[dict]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, status: int, payload, headers: dict | None = None):
                self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

            def _handle(self, method: str):
                path = unquote(urlsplit(self.path).path)
                body = self._body() if method in ("POST", "PUT") else b""
                hub.requests.append((method, path, dict(self.headers)))
                try:
                    hub.route(self, method, path, body)
                except Exception as error:  # surface server bugs as HTTP 500 + in the test log
                    hub.unhandled.append(f"{method} {path}: {error!r}")
                    self._json(500, {"error": repr(error)})

            def do_GET(self):
                self._handle("GET")

            def do_HEAD(self):
                self._handle("HEAD")

            def do_POST(self):
                self._handle("POST")

            def do_PUT(self):
                self._handle("PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # ------------------------------------------------------------------------------ routing
    def route(self, h, method: str, path: str, body: bytes) -> None:
        if path in IGNORED:
            return h._json(404, {"error": "not served by the stand-in"})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|revision)/(.+)", path)
        if method == "POST" and path == "/api/repos/create":
            data = json.loads(body)
            repo = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
            self.repos.setdefault(repo, {})
            return h._json(200, {"url": f"{self.url}/{repo}", "name": repo})
        if method == "POST" and path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            front = re.match(r"^---\n(.*?)\n---\n", content, re.S)
            if front is None or not isinstance(yaml.safe_load(front.group(1)), dict):
                return h._json(400, {"errors": [{"message": "README.md has no YAML metadata block"}]})
            return h._json(200, {"errors": [], "warnings": []})
        if m and method == "POST" and m.group(2) == "preupload":
            files = json.loads(body)["files"]
            return h._json(200, {"files": [
                {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                 "shouldIgnore": False}
                for f in files
            ]})
        if m and method == "POST" and m.group(2) == "commit":
            return self._commit(h, m.group(1), body)
        if m and method == "GET" and m.group(2) == "revision":
            return self._info(h, m.group(1))
        m_lfs = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
        if m_lfs and method == "POST":
            objects = json.loads(body)["objects"]
            return h._json(200, {"transfer": "basic", "objects": [
                {"oid": o["oid"], "size": o["size"], "authenticated": True,
                 "actions": {"upload": {"href": f"{self.url}/lfs-upload/{o['oid']}", "header": {}}}}
                for o in objects
            ]})
        m_put = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)
        if m_put and method == "PUT":
            if hashlib.sha256(body).hexdigest() != m_put.group(1):
                return h._json(400, {"error": "sha256 mismatch"})
            self.lfs[m_put.group(1)] = body
            return h._send(200)
        m_resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m_resolve and method in ("GET", "HEAD"):
            repo, _, filename = m_resolve.groups()
            files = self.repos.get(repo)
            if files is None or filename not in files:
                code = "RepoNotFound" if files is None else "EntryNotFound"
                return h._send(404, b"", {"X-Error-Code": code, "X-Error-Message": "not found"}, head=method == "HEAD")
            data = files[filename]
            headers = {"X-Repo-Commit": self.commits[repo], "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
            return h._send(200, data, headers, head=method == "HEAD")
        if method == "GET" and re.fullmatch(r"/api/models/[^/]+/[^/]+", path):
            return self._info(h, path[len("/api/models/"):])
        self.unhandled.append(f"{method} {path}")
        return h._json(404, {"error": "not implemented by the stand-in"}, {"X-Error-Code": "EntryNotFound"})

    def _info(self, h, repo: str):
        if repo not in self.repos:
            return h._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        return h._json(200, {"id": repo, "sha": self.commits.get(repo, "0" * 40),
                             "siblings": [{"rfilename": f} for f in sorted(self.repos[repo])]})

    def _commit(self, h, repo: str, body: bytes):
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        self.commit_payloads.append(lines)
        files = self.repos.setdefault(repo, {})
        for line in lines:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                data = self.lfs[value["oid"]]  # KeyError -> 500: committed an LFS file that was never uploaded
                assert len(data) == value["size"]
                files[value["path"]] = data
        oid = hashlib.sha1(body).hexdigest()
        self.commits[repo] = oid
        return h._json(200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid})

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub(monkeypatch):
    server = StandInHub().start()
    monkeypatch.setattr(hf_constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(transformers_hub, "_hf_api", None)  # the shared HfApi is rebuilt for the stand-in
    yield server
    server.stop()


def _uploaded_tensors(files: dict[str, bytes]) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, data in files.items():
        if name.endswith(".safetensors"):
            tensors.update(load_safetensors_bytes(data))
    return tensors


def test_push_to_hub_uploads_compact_files_and_card(hub, tmp_path):
    model = make_model()
    model.config.base_config._name_or_path = "google-bert/bert-base-uncased"
    info = model.push_to_hub(REPO, token=TOKEN, eval_results={"eval_accuracy": 0.75}, tags=["glue"])
    assert not hub.unhandled, hub.unhandled
    assert info.oid == hub.commits[REPO]

    endpoints = [
        (method, re.sub(r"[0-9a-f]{64}", "<oid>", path)) for method, path, _ in hub.requests if path not in IGNORED
    ]
    assert endpoints[0] == ("POST", "/api/repos/create")
    assert ("POST", "/api/validate-yaml") in endpoints
    assert ("POST", f"/api/models/{REPO}/preupload/main") in endpoints
    assert ("POST", f"/{REPO}.git/info/lfs/objects/batch") in endpoints
    assert ("PUT", "/lfs-upload/<oid>") in endpoints
    assert endpoints[-1] == ("POST", f"/api/models/{REPO}/commit/main")
    assert all(headers.get("authorization") == f"Bearer {TOKEN}" for method, path, headers in hub.requests
               if not path.startswith("/lfs-upload") and path not in IGNORED)

    files = hub.repos[REPO]
    assert sorted(files) == ["README.md", "config.json", "model.safetensors"]
    kinds = {line["value"]["path"]: line["key"] for line in hub.commit_payloads[-1] if line["key"] != "header"}
    assert kinds == {"model.safetensors": "lfsFile", "README.md": "file", "config.json": "file"}

    # The compact checkpoint went up: no dense expert tensors, the same bytes save_pretrained writes.
    tensors = _uploaded_tensors(files)
    assert not any(k.endswith((".expert_weight", ".static_weight", ".mask")) for k in tensors)
    assert any(k.endswith(".mask_packed") for k in tensors)
    model.save_pretrained(tmp_path / "local", eval_results={"eval_accuracy": 0.75})
    assert files["model.safetensors"] == (tmp_path / "local" / "model.safetensors").read_bytes()

    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == "google-bert/bert-base-uncased" and card.data.library_name == "transformers"
    assert {"pad-net", "mixture-of-experts", "glue"} <= set(card.data.tags)
    assert f'from_pretrained("{REPO}")' in card.text and "| eval_accuracy | 0.7500 |" in card.text
    assert f"{model.parameter_report().total:,}" in card.text

    # What was uploaded loads back to the exact module.
    for name, data in files.items():
        (tmp_path / "repo").mkdir(exist_ok=True)
        (tmp_path / "repo" / name).write_bytes(data)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "repo")
    assert_same_module(model, again)


def test_sharded_push_via_save_pretrained_and_load_by_repo_id(hub, tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id=REPO, token=TOKEN, max_shard_size="20KB")
    assert not hub.unhandled, hub.unhandled
    files = hub.repos[REPO]
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and ckpt.WEIGHTS_INDEX_NAME in files and "README.md" in files
    assert f'from_pretrained("{REPO}")' in files["README.md"].decode()

    # Download by repo id through `cached_file` / `hf_hub_download` (index first, then every shard).
    again = AutoModelForSequenceClassification.from_pretrained(REPO, token=TOKEN, cache_dir=tmp_path / "cache")
    assert not hub.unhandled, hub.unhandled
    downloaded = {path.rsplit("/", 1)[-1] for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path}
    assert set(shards) <= downloaded and ckpt.WEIGHTS_INDEX_NAME in downloaded
    assert_same_module(model, again)
    assert torch.equal(outputs(model), outputs(again))
    assert again.name_or_path == REPO


def test_push_refuses_nothing_silently(hub, tmp_path):
    """A corrupt upload is caught on download just like a local one."""
    model = make_model()
    model.push_to_hub(REPO, token=TOKEN)
    data = bytearray(hub.repos[REPO]["model.safetensors"])
    hub.repos[REPO]["model.safetensors"] = bytes(data[:-64])
    with pytest.raises(ckpt.PADCheckpointError, match="truncated"):
        AutoModelForSequenceClassification.from_pretrained(REPO, cache_dir=tmp_path / "cache")
