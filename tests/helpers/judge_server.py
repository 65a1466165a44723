"""A scripted OpenAI-protocol judge of the tests' own: fixed verdicts by prompt, faults in a fixed order.

    with ScriptedJudge(verdicts={"What is in the image?": "8 6"}, faults=[429, 500]) as judge:
        judge.url            # http://127.0.0.1:<port>/v1, what --judge-url takes
        judge.requests       # how many requests arrived (faults included)

``faults`` are answered first, one per request, in order: an HTTP status (429 with ``Retry-After: 0``,
5xx) or ``"garbage"`` (200 with a body that is not JSON). Then each prompt gets the verdict of the
first key it contains, or ``default``.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ScriptedJudge:
    def __init__(self, verdicts: dict[str, str], faults: list[int | str] | None = None, default: str = "no verdict"):
        self.verdicts, self.faults, self.default = verdicts, list(faults or []), default
        self.requests = 0
        self.lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.lock:
                    judge.requests += 1
                    fault = judge.faults.pop(0) if judge.faults else None
                if isinstance(fault, int):
                    self.send_response(fault)
                    self.send_header("Retry-After", "0")
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(json.dumps({"error": {"message": f"scripted {fault}"}}).encode())
                    return
                prompt = body["messages"][-1]["content"]
                verdict = next((v for key, v in judge.verdicts.items() if key in prompt), judge.default)
                payload = b"{not json" if fault == "garbage" else json.dumps({
                    "id": "judge-1", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": verdict},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> ScriptedJudge:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
