"""A loopback HTTP proxy in front of moto that throttles writes or delays every request (fault injection
for S3 uploads; a slow object store for the checkpoint-upload benchmark)."""

from __future__ import annotations

import http.server
import threading
import time
import urllib.error
import urllib.request


class FlakyS3Proxy:
    """A loopback HTTP proxy in front of the S3 server that answers the first ``failures`` writes with
    503 SlowDown (what S3 sends when it throttles), then forwards everything, each request after
    ``delay_s`` (a distant or busy object store)."""

    def __init__(self, upstream: str, failures: int = 0, delay_s: float = 0.0):
        self.upstream, self.failures, self.injected, self.forwarded_writes = upstream, failures, 0, 0
        self.delay_s = delay_s
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers "Expect: 100-continue", as the AWS SDK asks before a body

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = b""
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    body += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                return body

            def _forward(self):
                body = self._read_body()
                time.sleep(proxy.delay_s)
                if self.command in ("PUT", "POST") and proxy.injected < proxy.failures:
                    proxy.injected += 1
                    error = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(error)
                    return
                proxy.forwarded_writes += self.command in ("PUT", "POST")
                dropped = ("host", "content-length", "transfer-encoding", "expect", "connection")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
                request = urllib.request.Request(proxy.upstream + self.path, data=body or None, method=self.command,
                                                 headers=headers)
                try:
                    with urllib.request.urlopen(request, timeout=30) as response:
                        status, reply, reply_headers = response.status, response.read(), response.headers
                except urllib.error.HTTPError as error:
                    status, reply, reply_headers = error.code, error.read(), error.headers
                self.send_response(status)
                for key, value in reply_headers.items():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(reply)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
