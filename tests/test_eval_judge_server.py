"""A loopback OpenAI-compatible chat-completions server for the evaluation tests (imported by them), and its test.

It records every request body, answers deterministically from the request's content (an AlpacaEval
request gets top logprobs for "m"/"M", any other request a "Rating: [[r]]" judgment), and can misbehave
on purpose: fail chosen attempts with 429/500/timeouts/malformed bodies, or reject chosen items for good.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time

import pytest
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def digest(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def answer_for(body: dict) -> dict:
    """The deterministic choice for a request body."""
    content = body["messages"][-1]["content"]
    h = digest(content)
    if body.get("logprobs"):
        p_first = 0.02 + 0.96 * (h % 1000) / 999  # probability of "m" (the first shown output)
        tops = [{"token": "m", "logprob": math.log(p_first), "bytes": [109]},
                {"token": "M", "logprob": math.log(1 - p_first), "bytes": [77]},
                {"token": "Both", "logprob": -20.0, "bytes": [66, 111, 116, 104]}]
        best = tops[0] if p_first >= 0.5 else tops[1]
        return {"index": 0, "finish_reason": "length",
                "message": {"role": "assistant", "content": best["token"]},
                "logprobs": {"content": [{"token": best["token"], "logprob": best["logprob"], "bytes": best["bytes"],
                                          "top_logprobs": tops}]}}
    rating = h % 10 + 1
    return {"index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": f"The answer is judged. Rating: [[{rating}]]"}}


class JudgeServer:
    """`faults(content, attempt)` -> None (answer), an int status, "timeout" or "malformed"."""

    def __init__(self, faults=None, timeout_sleep: float = 1.0):
        self.bodies: list[dict] = []
        self.raw: list[bytes] = []
        self.auth: list[str | None] = []
        self.attempts: dict[str, int] = {}
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status, payload: bytes, headers=()):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                body = json.loads(raw)
                content = body["messages"][-1]["content"]
                with outer.lock:
                    outer.raw.append(raw)
                    outer.bodies.append(body)
                    outer.auth.append(self.headers.get("Authorization"))
                    attempt = outer.attempts.get(content, 0)
                    outer.attempts[content] = attempt + 1
                fault = faults(content, attempt) if faults else None
                if fault == "timeout":
                    time.sleep(timeout_sleep)
                    fault = None  # the client has given up by now; answer anyway
                if fault == "malformed":
                    self._send(200, b'{"id": "x", "object": "chat.completion", "choices": []}')
                    return
                if isinstance(fault, int):
                    headers = [("Retry-After", "0")] if fault == 429 else []
                    self._send(fault, json.dumps({"error": {"message": f"planned {fault}"}}).encode(), headers)
                    return
                payload = {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body["model"],
                           "choices": [answer_for(body)],
                           "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
                self._send(200, json.dumps(payload).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_the_loopback_judge_answers_deterministically_and_records_bodies():
    import openai

    with JudgeServer() as server:
        client = openai.OpenAI(base_url=server.url, api_key="k", max_retries=0)
        messages = [{"role": "user", "content": "judge this"}]
        first = client.chat.completions.create(model="m", messages=messages, logprobs=True, top_logprobs=5, max_tokens=1)
        again = client.chat.completions.create(model="m", messages=messages, logprobs=True, top_logprobs=5, max_tokens=1)
    assert first.choices[0].model_dump(exclude_none=True) == again.choices[0].model_dump(exclude_none=True)
    tops = first.choices[0].logprobs.content[0].top_logprobs
    assert sum(math.exp(t.logprob) for t in tops if t.token in ("m", "M")) == pytest.approx(1.0)
    assert server.bodies == [{"model": "m", "messages": messages, "logprobs": True, "top_logprobs": 5,
                              "max_tokens": 1}] * 2
