"""A small in-memory Hugging Face Hub on 127.0.0.1 for tests that push and download without network.

It serves the routes huggingface_hub 2.x uses to create repos and branches, validate card metadata, commit
(files are "regular" uploads sent base64 in the commit, except parquet shards, which go through the LFS batch
API as `datasets.push_to_hub` needs) and download (`/api/models/{repo}/revision/{rev}`,
`HEAD|GET /{repo}/resolve/{rev}/{path}`, the agent-harness registry it reads while downloading), for model repos
and, under `/api/datasets/` and `/datasets/`, for dataset repos, with the `tree` and `paths-info` listings
`datasets.load_dataset` reads. `add_repo` serves a repo without pushing it (timm weights, a dataset). Point a
process at it with `HF_ENDPOINT=hub.url` (and `HF_HUB_DISABLE_XET=1`) set before huggingface_hub is imported there.
`save_tiny_model` writes the small real model these tests push, download and run.
"""

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import torch
import yaml
from helpers import tiny_deeplab

from stpp_hf import DeepLabImageProcessor

REPO = r"(?P<repo>[^/]+/[^/]+)"
API = r"^/api/(?P<kind>models|datasets)"  # model and dataset repos answer the same routes
RESOLVE = rf"^/(?:(?P<kind>datasets)/)?{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)$"
API_ROUTES = {
    ("POST", re.compile(r"^/api/repos/create$")): "create_repo",
    ("POST", re.compile(r"^/api/validate-yaml$")): "validate_yaml",
    ("POST", re.compile(rf"{API}/{REPO}/preupload/(?P<revision>[^/]+)$")): "preupload",
    ("POST", re.compile(rf"{API}/{REPO}/commit/(?P<revision>[^/]+)$")): "commit",
    ("POST", re.compile(rf"{API}/{REPO}/branch/(?P<branch>[^/]+)$")): "create_branch",
    ("GET", re.compile(rf"{API}/{REPO}(?:/revision/(?P<revision>[^/]+))?$")): "model_info",
    ("GET", re.compile(rf"{API}/{REPO}/tree/(?P<revision>[^/]+)(?:/(?P<path>.+))?$")): "tree",
    ("POST", re.compile(rf"{API}/{REPO}/paths-info/(?P<revision>[^/]+)$")): "paths_info",
    (
        "POST",
        re.compile(r"^/(?:(?P<kind>datasets)/)?(?P<repo>[^/]+/[^/]+?)\.git/info/lfs/objects/batch$"),
    ): "lfs_batch",
    ("PUT", re.compile(r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$")): "lfs_upload",
    ("GET", re.compile(RESOLVE)): "resolve",
    ("HEAD", re.compile(RESOLVE)): "resolve",
    ("GET", re.compile(r"^/api/agent-harnesses$")): "agent_harnesses",
}
WRITE_ROUTES = {"create_repo", "preupload", "commit", "create_branch", "lfs_batch"}
LFS_SUFFIXES = (".parquet",)  # uploaded through the LFS batch API, as `datasets.push_to_hub` expects


@dataclass
class FakeRepo:
    private: bool
    branches: dict[str, tuple[str, dict[str, bytes]]] = field(default_factory=dict)  # name -> (commit sha, files)
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> files (clients pin downloads to a sha)
    commit_messages: list[str] = field(default_factory=list)

    def record(self, branch: str, sha: str, files: dict[str, bytes], message: str):
        self.branches[branch] = (sha, files)
        self.commits[sha] = files
        self.commit_messages.append(message)

    def lookup(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        """(commit sha, files) of a branch name or a commit sha; None if neither."""
        if revision in self.branches:
            return self.branches[revision]
        return (revision, self.commits[revision]) if revision in self.commits else None


class FakeHub:
    """`with FakeHub(token=...) as hub:` serves at `hub.url`; `hub.repos` holds what was pushed.

    Args:
        token: when set, write requests must carry `Authorization: Bearer <token>` (else 401).
        fail_commits: answer every commit with HTTP 500, as a Hub outage would.
    """

    def __init__(self, token: str | None = None, fail_commits: bool = False):
        self.token, self.fail_commits = token, fail_commits
        self.repos: dict[str, FakeRepo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content uploaded through the LFS batch API
        self.unhandled: list[str] = []  # requests with no route: the fake must grow, or the client changed
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        return self.repos[repo_key(repo_id, repo_type)].branches[revision][1]

    def add_repo(self, repo_id: str, files: dict[str, bytes], repo_type: str = "model", private: bool = False) -> None:
        """Serve a repo whose `main` holds `files` (path -> content), as if someone had pushed it."""
        repo = FakeRepo(private=private)
        repo.record("main", _sha(repo_id, files), dict(files), "initial commit")
        self.repos[repo_key(repo_id, repo_type)] = repo

    # ----- route handlers: (status, headers, body) -----

    def create_repo(self, request: dict) -> tuple:
        repo_id = "/".join(part for part in (request["json"].get("organization"), request["json"]["name"]) if part)
        repo_id = repo_key(repo_id, request["json"].get("type"))
        if repo_id in self.repos:
            # like the Hub, a conflict still names the repo URL (create_repo(exist_ok=True) reads it)
            return 409, {}, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
        initial_files = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
        self.add_repo(repo_id, initial_files, private=request["json"].get("visibility") == "private")
        return 200, {}, {"url": f"{self.url}/{repo_id}"}

    def validate_yaml(self, request: dict) -> tuple:
        content = request["json"]["content"]
        match = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else None
        except yaml.YAMLError as error:
            return 400, {}, {"errors": [{"message": f"invalid YAML: {error}"}]}
        if not isinstance(metadata, dict):
            return 400, {}, {"errors": [{"message": "README.md has no YAML metadata block"}]}
        return 200, {}, {"warnings": []}

    def preupload(self, request: dict, repo: FakeRepo, revision: str) -> tuple:
        files = [
            {"path": entry["path"], "uploadMode": "lfs" if entry["path"].endswith(LFS_SUFFIXES) else "regular",
             "shouldIgnore": False, "oid": None}
            for entry in request["json"]["files"]
        ]  # fmt: skip
        return 200, {}, {"files": files}

    def commit(self, request: dict, repo: FakeRepo, revision: str) -> tuple:
        if self.fail_commits:
            return 500, {}, {"error": "Internal Error - We're working hard to fix this as soon as possible!"}
        if revision not in repo.branches:
            return 404, {"X-Error-Code": "RevisionNotFound"}, {"error": f"Invalid rev id: {revision}"}
        lines = [json.loads(line) for line in request["body"].decode().splitlines() if line.strip()]
        files = dict(repo.branches[revision][1])
        for line in lines:
            if line["key"] == "file":
                files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            elif line["key"] == "lfsFile":
                if line["value"]["oid"] not in self.lfs_objects:
                    return (
                        400,
                        {},
                        {"error": f"LFS object {line['value']['oid']} of {line['value']['path']} was never uploaded"},
                    )
                files[line["value"]["path"]] = self.lfs_objects[line["value"]["oid"]]
            elif line["key"] == "deletedFile":
                files.pop(line["value"]["path"], None)
            elif line["key"] != "header":
                return 400, {}, {"error": f"the fake Hub does not handle commit entries of kind {line['key']!r}"}
        sha = _sha(request["path"], files)
        repo.record(revision, sha, files, lines[0]["value"]["summary"])
        return 200, {}, {"commitUrl": f"{self.url}/{request['repo']}/commit/{sha}", "commitOid": sha}

    def lfs_batch(self, request: dict, repo: FakeRepo) -> tuple:
        """Upload instructions (a PUT to this server) for every object not stored yet."""
        objects = []
        for item in json.loads(request["body"])["objects"]:
            entry = {"oid": item["oid"], "size": item["size"]}
            if item["oid"] not in self.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self.url}/lfs-upload/{item['oid']}"}}
            objects.append(entry)
        return 200, {}, {"transfer": "basic", "objects": objects}

    def lfs_upload(self, request: dict, oid: str) -> tuple:
        if hashlib.sha256(request["body"]).hexdigest() != oid:
            return 400, {}, {"error": "content does not match its sha256"}
        self.lfs_objects[oid] = request["body"]
        return 200, {}, {}

    def create_branch(self, request: dict, repo: FakeRepo, branch: str) -> tuple:
        if branch in repo.branches:
            return 409, {}, {"error": f"Branch {branch} already exists"}
        starting_point = request["json"].get("startingPoint") or "main"
        repo.branches[branch] = repo.branches[starting_point]
        return 200, {}, {}

    def model_info(self, request: dict, repo: FakeRepo, revision: str | None) -> tuple:
        revision = revision or "main"
        if repo.lookup(revision) is None:
            return 404, {"X-Error-Code": "RevisionNotFound"}, {"error": f"Invalid rev id: {revision}"}
        sha, files = repo.lookup(revision)
        siblings = [{"rfilename": path} for path in sorted(files)]
        return 200, {}, {"id": request["repo"], "sha": sha, "private": repo.private, "siblings": siblings, "tags": []}

    def agent_harnesses(self, request: dict) -> tuple:
        # huggingface_hub's agent detection (download progress bars) reads this registry; an empty one detects none
        return 200, {}, {"standardEnvVars": [], "harnesses": {}}

    def tree(self, request: dict, repo: FakeRepo, revision: str, path: str | None) -> tuple:
        """The files and folders under `path` (all levels with `recursive=true`), as `list_repo_tree` reads them."""
        if repo.lookup(revision) is None:
            return 404, {"X-Error-Code": "RevisionNotFound"}, {"error": f"Invalid rev id: {revision}"}
        prefix = f"{path.strip('/')}/" if path else ""
        entries = {}
        for name, content in repo.lookup(revision)[1].items():
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix) :].split("/")
            depth = len(parts) if "recursive=true" in request["query"] else 1
            for level in range(1, min(depth, len(parts) - 1) + 1):  # the folders on the way
                folder = prefix + "/".join(parts[:level])
                entries[folder] = {"type": "directory", "path": folder, "oid": _sha(folder)}
            if len(parts) <= depth:
                entries[name] = _file_entry(name, content)
        if path and not entries:
            return 404, {"X-Error-Code": "EntryNotFound"}, {"error": f"{path} not found"}
        return 200, {}, [entries[name] for name in sorted(entries)]

    def paths_info(self, request: dict, repo: FakeRepo, revision: str) -> tuple:
        if repo.lookup(revision) is None:
            return 404, {"X-Error-Code": "RevisionNotFound"}, {"error": f"Invalid rev id: {revision}"}
        files = repo.lookup(revision)[1]
        asked = request["json"].get("paths") or parse_qs(request["body"].decode()).get("paths", [])
        found = []
        for path in asked:
            path = path.strip("/")
            if path in files:
                found.append(_file_entry(path, files[path]))
            elif any(name.startswith(f"{path}/") for name in files):
                found.append({"type": "directory", "path": path, "oid": _sha(path)})
        return 200, {}, found

    def resolve(self, request: dict, repo: FakeRepo, revision: str, path: str) -> tuple:
        if repo.lookup(revision) is None:
            return 404, {"X-Error-Code": "RevisionNotFound"}, {"error": f"Invalid rev id: {revision}"}
        sha, files = repo.lookup(revision)
        if path not in files:
            return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha}, {"error": f"{path} not found"}
        content = files[path]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(content).hexdigest()}"', "Accept-Ranges": "bytes"}
        wanted = re.fullmatch(r"bytes=(\d*)-(\d*)", request.get("range") or "")
        if wanted is None:
            return 200, headers, content
        # a byte range, as a streamed parquet file is read (its footer first, then column chunks)
        first, last = wanted.groups()
        start = len(content) - int(last) if not first else int(first)
        stop = len(content) if not first or not last else min(int(last) + 1, len(content))
        start = max(start, 0)
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(content)}"
        return 206, headers, content[start:stop]


def save_tiny_model(directory, class_names: tuple[str, ...], seed: int = 0):
    """Save a small real DeepLabV3+ (resnet18, narrow head) with its image processor; return the model (eval)."""
    torch.manual_seed(seed)
    model = tiny_deeplab(
        id2label=dict(enumerate(class_names)), aspp_channels=16, low_level_channels=8, decoder_channels=16
    ).eval()
    model.save_pretrained(directory)
    DeepLabImageProcessor().save_pretrained(directory)
    return model


def repo_key(repo_id: str, repo_type: str | None) -> str:
    """Where `FakeHub.repos` keeps a repo: models under their id, datasets under `datasets/<id>` (ids may repeat)."""
    return repo_id if repo_type in (None, "model", "models") else f"datasets/{repo_id}"


def _file_entry(path: str, content: bytes) -> dict:
    return {"type": "file", "path": path, "size": len(content), "oid": hashlib.sha1(content).hexdigest()}


def _sha(*parts) -> str:
    return hashlib.sha1(repr(parts).encode()).hexdigest()


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # keep test output clean
            pass

        def do_GET(self):
            self.dispatch("GET")

        def do_HEAD(self):
            self.dispatch("HEAD")

        def do_POST(self):
            self.dispatch("POST")

        def do_PUT(self):
            self.dispatch("PUT")

        def dispatch(self, method: str):
            path = urlsplit(self.path).path
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            for (route_method, pattern), name in API_ROUTES.items():
                match = pattern.match(path) if route_method == method else None
                if match:
                    break
            else:
                hub.unhandled.append(f"{method} {path}")
                return self.reply(method, 404, {}, {"error": f"the fake Hub has no route {method} {path}"})
            if name in WRITE_ROUTES and hub.token and self.headers.get("Authorization") != f"Bearer {hub.token}":
                return self.reply(method, 401, {}, {"error": "Invalid credentials in Authorization header"})
            arguments = {key: None if value is None else unquote(value) for key, value in match.groupdict().items()}
            is_json = self.headers.get("Content-Type", "").startswith("application/json")
            request = {
                "path": path,
                "query": urlsplit(self.path).query,
                "body": body,
                "json": json.loads(body) if is_json and body else {},
                "range": self.headers.get("Range"),
            }
            request["repo"] = arguments.pop("repo", None)
            stored_as = repo_key(request["repo"], arguments.pop("kind", None))
            with hub.lock:
                if request["repo"] is not None:
                    if stored_as not in hub.repos:
                        return self.reply(
                            method, 404, {"X-Error-Code": "RepoNotFound"}, {"error": "Repository not found"}
                        )
                    arguments = {"repo": hub.repos[stored_as], **arguments}
                status, headers, payload = getattr(hub, name)(request, **arguments)
            self.reply(method, status, headers, payload)

        def reply(self, method: str, status: int, headers: dict, payload):
            content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header(
                "Content-Type", "application/octet-stream" if isinstance(payload, bytes) else "application/json"
            )
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(content)

    return Handler
