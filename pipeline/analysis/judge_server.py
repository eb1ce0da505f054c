"""A small OpenAI-compatible server for a bundled chat model: ``/v1/chat/completions`` with logprobs.

``transformers serve`` (transformers 5.23) cannot stand in: its chat-completions handler
rejects ``logprobs`` and ``top_logprobs`` (``UNUSED_CHAT_COMPLETION_FIELDS``) and it needs
fastapi, uvicorn and openai, which the project does not install. This server is the standard
library's ``http.server`` around ``LocalJudge`` (chat template, greedy decoding), one request
at a time: ``POST /v1/chat/completions`` (``messages``, ``max_tokens``, ``logprobs``,
``top_logprobs`` up to 20; temperature is ignored, decoding is greedy) and ``GET /v1/models``.
Run it with ``nnd judge-server`` and point ``NND_JUDGE_BASE_URL`` at the URL it prints.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import torch

from pipeline.analysis.judge import LocalJudge

MAX_TOP_LOGPROBS = 20


def load_chat_model(name: str, data_dir: Path) -> LocalJudge:
    """The bundled model's HF weights and tokenizer only (no TransformerBridge), as a chat judge."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.data.models import ensure_model

    folder = ensure_model(name, data_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return LocalJudge(model, tokenizer, name=name, render="chat")


def _token_entry(tok, token_id: int, logprob: float) -> dict:
    text = tok.decode([token_id])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def completion(judge: LocalJudge, body: dict, model_name: str) -> dict:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
    top = min(int(body.get("top_logprobs") or 0), MAX_TOP_LOGPROBS)
    ids, steps = judge.generate(messages, max_tokens)
    choice = {"index": 0, "message": {"role": "assistant", "content": judge.tok.decode(ids, skip_special_tokens=True)},
              "finish_reason": "length" if len(ids) >= max_tokens else "stop", "logprobs": None}
    if body.get("logprobs"):
        content = []
        for t, lp in zip(ids, steps):
            entry = _token_entry(judge.tok, t, float(lp[t]))
            values, top_ids = lp.topk(top) if top else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
            entry["top_logprobs"] = [_token_entry(judge.tok, int(i), float(v)) for v, i in zip(values, top_ids)]
            content.append(entry)
        choice["logprobs"] = {"content": content}
    prompt_tokens = len(judge.ids(messages))
    return {"id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion", "created": int(time.time()),
            "model": model_name, "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(ids),
                      "total_tokens": prompt_tokens + len(ids)}}


def make_handler(judge: LocalJudge, model_name: str):
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                return self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model"}]})
            self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with lock:
                    out = completion(judge, body, model_name)
            except (ValueError, KeyError, TypeError) as e:
                return self._send(400, {"error": {"message": str(e), "type": "invalid_request_error"}})
            self._send(200, out)

        def log_message(self, format, *args):  # quiet: one line per request is noise for a judge
            pass

    return Handler


def serve(name: str, data_dir: Path, host: str = "127.0.0.1", port: int = 8000) -> None:
    judge = load_chat_model(name, data_dir)
    server = HTTPServer((host, port), make_handler(judge, name))
    print(f"judge-server: serving {name} at http://{host}:{server.server_port}/v1 (model name {name})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        sys.stdout.flush()
