"""A Hub-compatible HTTP server on 127.0.0.1 with just the endpoints huggingface_hub's client uses to create a repo,
upload (preupload + ndjson commit) and download (revision info, tree, resolve). In memory; for tests only."""

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


class HubState:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo_id -> {"files": {path: bytes}, "sha": str}
        self.requests: list[str] = []
        self.unhandled: list[str] = []
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    state: HubState

    def log_message(self, *args):
        pass

    # ---- helpers --------------------------------------------------------------------------------------------
    def reply(self, status, body=b"", headers=None, content_type="application/json"):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def not_found(self, code, message, repo=None):
        headers = {"X-Error-Code": code, "X-Error-Message": message}
        if repo is not None:
            headers["X-Repo-Commit"] = repo["sha"]
        self.reply(404, {"error": message}, headers)

    def body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def route(self, routes):
        path = unquote(urlparse(self.path).path)
        self.state.requests.append(f"{self.command} {path}")
        for pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if match:
                return handler(**match.groupdict())
        self.state.unhandled.append(f"{self.command} {path}")
        self.reply(404, {"error": f"not implemented: {self.command} {path}"})

    def repo(self, repo_id):
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self.not_found("RepoNotFound", f"Repository {repo_id} not found")
        return repo

    # ---- endpoints ------------------------------------------------------------------------------------------
    def create_repo(self):
        request = json.loads(self.body())
        repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
        url = f"http://{self.headers['Host']}/{repo_id}"
        with self.state.lock:
            if repo_id in self.state.repos:
                return self.reply(409, {"error": "You already created this model repo", "url": url})
            self.state.repos[repo_id] = {"files": {}, "sha": hashlib.sha1(repo_id.encode()).hexdigest()}
        self.reply(200, {"url": url, "name": repo_id, "id": repo_id})

    def preupload(self, repo, revision):
        if (state := self.repo(repo)) is None:
            return
        files = json.loads(self.body())["files"]
        self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                                   for f in files], "commitOid": state["sha"]})

    def commit(self, repo, revision):
        if (state := self.repo(repo)) is None:
            return
        digest = hashlib.sha1(state["sha"].encode())
        with self.state.lock:
            for line in self.body().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    content = base64.b64decode(item["value"]["content"])
                    state["files"][item["value"]["path"]] = content
                    digest.update(item["value"]["path"].encode() + content)
                elif item["key"] in ("deletedFile", "deletedFolder"):
                    state["files"].pop(item["value"]["path"], None)
                elif item["key"] != "header":
                    return self.reply(400, {"error": f"unsupported commit operation {item['key']}"})
            state["sha"] = digest.hexdigest()
        base = f"http://{self.headers['Host']}/{repo}"
        self.reply(200, {"commitUrl": f"{base}/commit/{state['sha']}", "commitOid": state["sha"], "pullRequestUrl": None})

    def info(self, repo, revision="main"):
        if (state := self.repo(repo)) is None:
            return
        self.reply(200, {"id": repo, "modelId": repo, "sha": state["sha"], "private": False, "tags": [],
                         "siblings": [{"rfilename": path} for path in sorted(state["files"])]})

    def tree(self, repo, revision, path=None):
        if (state := self.repo(repo)) is None:
            return
        path = (path or "").strip("/")
        prefix = f"{path}/" if path else ""
        entries = [{"type": "file", "path": p, "size": len(c), "oid": hashlib.sha1(c).hexdigest()}
                   for p, c in sorted(state["files"].items()) if p.startswith(prefix) and "/" not in p[len(prefix):]]
        if prefix and not entries:
            return self.not_found("EntryNotFound", f"{path} does not exist on {revision}", state)
        self.reply(200, entries)

    def resolve(self, repo, revision, path):
        if (state := self.repo(repo)) is None:
            return
        content = state["files"].get(path)
        if content is None:
            return self.not_found("EntryNotFound", f"{path} does not exist on {revision}", state)
        etag = f'"{hashlib.sha256(content).hexdigest()}"'
        self.reply(200, content, {"X-Repo-Commit": state["sha"], "ETag": etag}, "application/octet-stream")

    def validate_yaml(self):
        self.body()
        self.reply(200, {"errors": [], "warnings": []})

    # ---- dispatch -------------------------------------------------------------------------------------------
    def do_POST(self):
        self.route([
            (r"/api/repos/create", self.create_repo),
            (r"/api/validate-yaml", self.validate_yaml),
            (rf"/api/models/{REPO}/preupload/(?P<revision>[^/]+)", self.preupload),
            (rf"/api/models/{REPO}/commit/(?P<revision>[^/]+)", self.commit),
        ])

    def do_GET(self):
        self.route([
            (rf"/api/models/{REPO}/revision/(?P<revision>[^/]+)", self.info),
            (rf"/api/models/{REPO}", self.info),
            (rf"/api/models/{REPO}/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?", self.tree),
            (rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", self.resolve),
        ])

    do_HEAD = do_GET


def serve() -> tuple[ThreadingHTTPServer, HubState]:
    """Start the server on a free loopback port in a daemon thread; `server.server_address` holds the port."""
    state = HubState()
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state
