"""A loopback HTTP server that answers like a stepzip replica (for client and CLI tests).

It answers /v1/compress in the real response schema (one result per problem, its id
echoed) and /health with a `max_problems`, so routing, failover, batching and merging
run over real sockets without an engine; tests/integration/test_replicas.py does the
same against real stepzip servers.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def compress_answer(body: dict) -> dict:
    """A /v1/compress response for `body`: per problem one trace with one variant per
    requested ratio (numbers made up; the shapes are the schema's)."""
    ratios = [v.get("ratio", 0.8) for v in body.get("variants", [{}])]
    results = []
    for p in body["problems"]:
        variants = [{"strategy": "low", "ratio": r, "kept_steps": [0], "skipped_steps": [1],
                     "compressed_text": "a\n[SKIP]", "n_steps": 2, "n_skipped": 1,
                     "tokens_before": 40, "tokens_after": 21, "reduction": 0.475,
                     "extracted_answer": "a very long extracted answer that goes on",
                     "correct": False} for r in ratios]
        trace = {"sample": 0, "completion": "a\nb", "reasoning": "a\nb",
                 "finish_reason": "length", "steps": [], "variants": variants,
                 "answer_text": "", "extracted_answer": "42", "correct": True,
                 "completion_tokens": 40, "reasoning_tokens": 40, "entropy_total": 12.5}
        results.append({"id": p.get("id"), "prompt": p["text"], "gold": p.get("answer"),
                        "traces": [trace]})
    return {"model": "m", "delimiter": "\n", "results": results,
            "usage": {"prompt_tokens": len(results)},
            "timings": {"generate_s": 0.5, "total_s": 1.0}}


class Replica:
    """A loopback HTTP server. mode: ok | reset (close without answering) | 500 | 503 | 422;
    `hold` (an Event) makes /v1/compress wait until it is set."""

    def __init__(self, mode: str = "ok", max_problems: int = 64, hold=None):
        self.mode, self.max_problems, self.hold = mode, max_problems, hold
        self.seen: list[list[str]] = []  # problem ids of each compress request received
        self.loads = 0
        self.lock = threading.Lock()
        replica = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path == "/health":
                    self.reply(200, {"status": "ok", "max_problems": replica.max_problems})
                else:
                    self.reply(200, {"data": [{"weight_version": f"v{replica.loads}"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                if self.path == "/v1/weights/load":
                    replica.loads += 1
                    return self.reply(200, {"version": f"v{replica.loads}"})
                with replica.lock:
                    replica.seen.append([p.get("id") for p in body["problems"]])
                if replica.hold is not None:
                    replica.hold.wait(10)
                if replica.mode == "reset":
                    self.connection.shutdown(socket.SHUT_RDWR)  # died mid-request
                    return
                if replica.mode in ("500", "503"):
                    return self.reply(int(replica.mode), {"error": "engine died"})
                if replica.mode == "422":
                    return self.reply(422, {"error": "invalid request", "details": [
                        {"field": "problems.0.text", "reason": "must not be blank"}]})
                self.reply(200, compress_answer(body))

            def reply(self, status: int, payload: dict):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def problems_seen(self) -> int:
        return sum(len(ids) for ids in self.seen)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
