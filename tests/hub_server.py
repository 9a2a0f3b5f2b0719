"""A minimal Hugging Face Hub-compatible HTTP server on 127.0.0.1 for push/download tests (stdlib only)."""

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    """Stores files per repository in memory; serves the endpoints `huggingface_hub` uses for upload and download."""

    def __init__(self, lifetime_s=300):
        self.repos = {}  # repo id -> {"files": {path: bytes}, "sha": str}
        self.unknown = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status, body=b"", headers=None, head=False):
                if isinstance(body, (dict, list)):
                    body = json.dumps(body).encode()
                    headers = {"Content-Type": "application/json", **(headers or {})}
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _body(self):
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_POST(self):
                body = self._body()
                if self.path == "/api/repos/create":
                    request = json.loads(body)
                    repo = f"{request.get('organization') or 'user'}/{request['name']}"
                    hub.repos.setdefault(repo, {"files": {}, "sha": "0" * 40})
                    return self._reply(200, {"url": f"http://{self.headers['Host']}/{repo}", "name": repo, "id": repo})
                if self.path == "/api/validate-yaml":
                    return self._reply(200, {"errors": [], "warnings": []})
                match = re.fullmatch(r"/api/models/(.+?/.+?)/(preupload|commit)/([^/]+)", self.path)
                if match and match.group(2) == "preupload":
                    files = json.loads(body).get("files", [])
                    return self._reply(
                        200,
                        {
                            "files": [
                                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                            ]
                        },
                    )
                if match:
                    repo = hub.repos.setdefault(match.group(1), {"files": {}, "sha": "0" * 40})
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item.get("key") == "file":
                            repo["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    repo["sha"] = hashlib.sha1(json.dumps(sorted(repo["files"])).encode() + body).hexdigest()
                    return self._reply(
                        200, {"commitUrl": f"http://{self.headers['Host']}/{match.group(1)}", "commitOid": repo["sha"]}
                    )
                hub.unknown.append(("POST", self.path))
                return self._reply(404, {"error": "unknown endpoint"})

            def _get(self, head):
                path = self.path.split("?")[0]
                match = re.fullmatch(r"/api/models/(.+?/.+?)(?:/revision/([^/]+))?", path)
                if match and match.group(1) in hub.repos:
                    repo = hub.repos[match.group(1)]
                    return self._reply(
                        200,
                        {
                            "id": match.group(1),
                            "sha": repo["sha"],
                            "siblings": [{"rfilename": f} for f in repo["files"]],
                        },
                        head=head,
                    )
                match = re.fullmatch(r"/api/models/(.+?/.+?)/tree/([^/]+)(?:/(.*))?", path)
                if match and match.group(1) in hub.repos:
                    files = hub.repos[match.group(1)]["files"]
                    return self._reply(
                        200,
                        [
                            {"type": "file", "path": f, "oid": hashlib.sha1(c).hexdigest(), "size": len(c)}
                            for f, c in files.items()
                        ],
                        head=head,
                    )
                match = re.fullmatch(r"/(.+?/.+?)/resolve/([^/]+)/(.+)", path)
                if match and match.group(1) in hub.repos:
                    repo = hub.repos[match.group(1)]
                    content = repo["files"].get(match.group(3))
                    if content is None:
                        return self._reply(404, b"", {"X-Error-Code": "EntryNotFound"}, head=head)
                    headers = {"ETag": f'"{hashlib.sha1(content).hexdigest()}"', "X-Repo-Commit": repo["sha"]}
                    return self._reply(200, content, headers, head=head)
                hub.unknown.append(("GET", self.path))
                return self._reply(404, b"", {"X-Error-Code": "RepoNotFound"}, head=head)

            def do_GET(self):
                self._get(head=False)

            def do_HEAD(self):
                self._get(head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.timer = threading.Timer(lifetime_s, self.server.shutdown)  # never outlives the test session

    def __enter__(self):
        self.thread.start()
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()
