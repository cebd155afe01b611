"""A real HTTP proxy for tests: forwards every request to an upstream server, except those whose path holds
`fail_path`, which it answers as `mode` says: "500" (an internal server error) or "hang" (no answer until
the client gives up). With `cut_after`, the proxy goes away at an exact point of the client's traffic: once it
has forwarded a request that `cut_after(path, body)` picks, every later request is dropped unanswered and
every new connection refused, as when a server dies or the network drops, whatever the timing."""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class FaultyProxy:
    def __init__(self, upstream: str, fail_path: str, hang_s: float = 30.0, cut_after=None):
        self.upstream = urlsplit(upstream)
        self.fail_path, self.hang_s = fail_path, hang_s
        self.mode: str | None = None  # None: forward everything
        self.failed = 0  # requests answered with a fault
        self.cut_after = cut_after
        self.gone = threading.Event()  # set once cut_after picked a request: nothing is forwarded any more
        self.dropped = 0  # requests that arrived after that
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self._handle()

            def do_POST(self):
                self._handle()

            def do_PUT(self):
                self._handle()

            def do_PATCH(self):
                self._handle()

            def do_DELETE(self):
                self._handle()

            def _handle(self):
                body = self._body()
                if proxy.gone.is_set():
                    proxy.dropped += 1
                    self.close_connection = True  # no answer at all: the client sees the connection end
                    return
                if proxy.mode and proxy.fail_path in self.path:
                    proxy.failed += 1
                    if proxy.mode == "hang":
                        time.sleep(proxy.hang_s)
                        self.close_connection = True
                        return
                    self.send_error(500, "injected fault")
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=120)
                hop = ("host", "connection", "transfer-encoding", "content-length")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in hop}
                conn.request(self.command, self.path, body=body, headers=headers)
                reply = conn.getresponse()
                data = reply.read()
                self.send_response(reply.status)
                for key, value in reply.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()
                if proxy.cut_after and proxy.cut_after(self.path, body) and not proxy.gone.is_set():
                    proxy.gone.set()
                    threading.Thread(target=proxy.close, daemon=True).start()  # new connections: refused

            def _body(self) -> bytes:
                if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                chunks = []  # streamed uploads arrive chunked: size line, data, CRLF; a 0-size chunk ends them
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline().strip():  # trailers, up to the blank line
                    pass
                return b"".join(chunks)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
