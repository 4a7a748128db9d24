"""Helpers for the stage-two tests (imported by name: tests/ has no packages)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def tiny_toml(path: Path, data: Path, store: Path, run: Path, *, steps: int, save_every: int = 2,
              warmup_steps: int = 2, batch_size: int = 4, log_every: int = 10) -> Path:
    """The same audio-only tiny run as `tiny_cfg(..., data={"features": ["audio.hubert.mean"]})`, as a
    TOML file for `emollama train -c` in a subprocess."""
    path.write_text(f"""
[data]
root = "{data}"
store = "{store}"
features = ["audio.hubert.mean"]
standardize = true
[model]
profile = "tiny"
[lora]
alpha = 64
[optim]
lr = 3e-3
min_lr = 1e-5
warmup_steps = {warmup_steps}
steps = {steps}
batch_size = {batch_size}
[run]
out = "{run}"
seed = 7
save_every = {save_every}
eval_every = 0
log_every = {log_every}
""")
    return path


class FakeJudge:
    """Answers POST /v1/chat/completions with scripted replies, in order."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.seen = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.seen.append((self.path, self.headers.get("Authorization"), body))
                reply = outer.replies.pop(0)
                if reply == "HTTP500":
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b"boom")
                    return
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
