"""The judge's credentials stay out of errors, reprs and MLflow params (SECURITY.md item 7).

The judge here is a hostile OpenAI-compatible server on loopback that answers 401 and echoes
the Authorization header it received back in its error body, as some proxies do.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from llm_core.tracking import MlflowTracker, flatten_params
from pipeline.eval import judge
from pipeline.eval.run import HttpJudgeConfig

KEY = "sk-very-secret-key"


@pytest.fixture
def echoing_judge() -> Iterator[str]:
    class Echo(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            body = json.dumps(
                {"error": f"bad key {self.headers.get('Authorization')} for {self.path}"}
            ).encode()
            self.send_response(401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://bob:{KEY}@127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_judge_error_echoing_the_key_is_redacted(echoing_judge: str) -> None:
    with pytest.raises(RuntimeError) as err:
        judge.http_judge(
            echoing_judge, [[{"role": "user", "content": "hi"}]], ["a"], ["b"],
            model="m", api_key=KEY, timeout=5,
        )  # fmt: skip
    text = str(err.value)
    assert "HTTP 401" in text and "bad key" in text  # the error itself is still reported
    assert KEY not in text and "bob:" not in text


def test_judge_config_hides_key_and_url_credentials(echoing_judge: str, tmp_path: Path) -> None:
    cfg = HttpJudgeConfig.from_env({"JUDGE_URL": echoing_judge, "JUDGE_API_KEY": KEY})
    assert cfg is not None and cfg.api_key == KEY and cfg.url == echoing_judge
    assert KEY not in repr(cfg) and KEY not in cfg.public_url
    assert cfg.public_url.startswith("http://***@127.0.0.1:")
    # Whatever reaches MLflow params is scrubbed, whoever logs it (a real sqlite store).
    assert KEY not in json.dumps(flatten_params({"judge": {"url": echoing_judge}}))
    tracker = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "secrets")
    with tracker.start_run("judge", {}) as run:
        tracker.log_params({"judge": echoing_judge, "evaluation": {"judge_url": echoing_judge}})
    params = tracker.get_run(run.info.run_id).data.params
    assert params["judge"].startswith("http://***@127.0.0.1:")
    assert KEY not in json.dumps(params)
