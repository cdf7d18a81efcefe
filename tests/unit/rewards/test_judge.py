"""`name: judge` against a real local OpenAI-compatible HTTP server that answers scores, garbage, errors or
nothing (ThreadingHTTPServer on a free port, speaking /v1/chat/completions)."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from rl.config import JobConfig, load_job
from rl.config.rewards import JudgeReward, ShapingConfig
from rl.errors import UserError
from rl.registries import REWARD_MODELS


@dataclass
class Reply:
    """What the test server does with one request: answer `text` as the assistant's message (or `body` raw),
    with HTTP `status`, after `delay_s`; `hang` never answers (until the test ends)."""

    text: str | None = None
    status: int = 200
    body: bytes | None = None
    delay_s: float = 0.0
    hang: bool = False
    content_type: str = "application/json"


Script = Callable[[int, dict], Reply]
"""(request number from 0, the request's JSON) -> what to answer."""


@dataclass
class JudgeServer:
    url: str
    bodies: list[dict] = field(default_factory=list)
    headers: list[dict] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    @property
    def requests(self) -> int:
        return len(self.bodies)


def _completion(text: str, model: str) -> bytes:
    return json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": model, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}).encode()


@pytest.fixture
def judge_server() -> Iterator[Callable[[Script], JudgeServer]]:
    """`judge_server(script)` starts a server on a free port; all are stopped (hanging handlers released) at
    the end of the test."""
    servers: list[ThreadingHTTPServer] = []
    release = threading.Event()

    def start(script: Script) -> JudgeServer:
        lock = threading.Lock()
        state = JudgeServer(url="")

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet test output
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    n = state.requests
                    state.bodies.append(body)
                    state.headers.append({k.lower(): v for k, v in self.headers.items()})
                    state.in_flight += 1
                    state.max_in_flight = max(state.max_in_flight, state.in_flight)
                try:
                    reply = script(n, body) if self.path == "/v1/chat/completions" else Reply(status=404, body=b"{}")
                    if reply.hang:
                        release.wait(30)
                        return
                    time.sleep(reply.delay_s)
                finally:
                    with lock:
                        state.in_flight -= 1
                payload = reply.body if reply.body is not None else _completion(reply.text or "", body["model"])
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        return state

    yield start
    release.set()
    for server in servers:
        server.shutdown()
        server.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:  # bound then closed: nothing listens there, a connect is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def user_text(body: dict) -> str:
    return body["messages"][-1]["content"]


def judge_cfg(url: str, **kw: object) -> JudgeReward:
    return JudgeReward.model_validate({"name": "judge", "url": url, "model": "judge-m", **kw})


def make_judge(url: str, **kw: object):
    return REWARD_MODELS.get("judge")(judge_cfg(url, **kw))


def ask(judge, completions: list[str], fields: list[dict] | None = None) -> list[float | Exception]:
    try:
        return judge(["<rendered prompt>"] * len(completions), completions,
                     fields or [{"question": "q"}] * len(completions))
    finally:
        judge.close()


def scorer_of(cfg: JudgeReward):
    from rewards.scoring import build_scorer

    return build_scorer([cfg], ShapingConfig())


# ----- scores ----------------------------------------------------------------------------------------
def echo_score(n: int, body: dict) -> Reply:
    """Answers the score written after `S=` in the completion, after a decoy score the parse must skip."""
    score = user_text(body).split("S=")[1].split()[0]
    return Reply(text=f"Score: 0 would be harsh.\nMy verdict. Score: {score}\n")


def test_scores_are_the_last_match_normalized_by_score_range(judge_server):
    server = judge_server(echo_score)
    got = ask(make_judge(server.url), ["S=7", "S=0", "S=10", "S=2.5"])
    assert got == [0.7, 0.0, 1.0, 0.25]
    got = ask(make_judge(server.url, score_range=[1, 5]), ["S=1", "S=3", "S=5"])
    assert got == [0.0, 0.5, 1.0]
    got = ask(make_judge(server.url, normalize=False, score_range=None), ["S=-3", "S=42.5"])
    assert got == [-3.0, 42.5]


def test_prompt_system_and_sampling_are_sent_filled_with_the_sample(judge_server, monkeypatch):
    server = judge_server(lambda n, body: Reply(text="Score: 5"))
    monkeypatch.setenv("JUDGE_KEY", "sekret")
    judge = make_judge(server.url, prompt="Q={question}|A={answer}|P={prompt}|C={completion}|{{literal}}",
                       system="be fair", max_tokens=7, temperature=0.5, api_key_env="JUDGE_KEY")
    try:
        got = judge(["P0", "P1"], ["C0", "C1"], [{"question": "Q0", "answer": 3}, {"question": "Q1", "answer": "x"}])
    finally:
        judge.close()
    assert got == [0.5, 0.5]
    bodies = sorted(server.bodies, key=user_text)
    assert [b["messages"] for b in bodies] == [
        [{"role": "system", "content": "be fair"}, {"role": "user", "content": "Q=Q0|A=3|P=P0|C=C0|{literal}"}],
        [{"role": "system", "content": "be fair"}, {"role": "user", "content": "Q=Q1|A=x|P=P1|C=C1|{literal}"}]]
    assert {(b["model"], b["max_tokens"], b["temperature"]) for b in bodies} == {("judge-m", 7, 0.5)}
    assert {h["authorization"] for h in server.headers} == {"Bearer sekret"}


def test_a_placeholder_the_sample_lacks_is_that_samples_error(judge_server):
    server = judge_server(lambda n, body: Reply(text="Score: 8"))
    got = ask(make_judge(server.url, prompt="{question} -> {completion} (reference: {answer})"),
              ["a", "b"], [{"question": "q", "answer": "4"}, {"question": "q"}])
    assert got[0] == 0.8
    assert isinstance(got[1], Exception) and "{answer}" in str(got[1])
    assert server.requests == 1  # the sample without `answer` never reached the judge


def test_the_default_prompt_needs_the_question(judge_server):
    server = judge_server(lambda n, body: Reply(text="Score: 8"))
    got = ask(make_judge(server.url), ["a"], [{}])
    assert isinstance(got[0], Exception) and "{question}" in str(got[0])


def test_batches_in_a_row_and_calls_from_threads_and_running_loops(judge_server):
    server = judge_server(echo_score)
    judge = make_judge(server.url)
    results: list[object] = []

    async def inside_a_loop() -> list[float | Exception]:
        return judge(["p"], ["S=4"], [{"question": "q"}])

    try:
        results.append(judge(["p"], ["S=1"], [{"question": "q"}]))
        results.append(judge(["p"], ["S=2"], [{"question": "q"}]))  # a new event loop: the old one's sockets are gone
        thread = threading.Thread(target=lambda: results.append(judge(["p"], ["S=3"], [{"question": "q"}])))
        thread.start()
        thread.join(10)
        results.append(asyncio.run(inside_a_loop()))
    finally:
        judge.close()
    assert results == [[0.1], [0.2], [0.3], [0.4]]


# ----- failures, contained ------------------------------------------------------------------------------
GARBAGE = {
    "no score": Reply(text="I like it a lot."),
    "out of range": Reply(text="Score: 11"),
    "empty answer": Reply(text=""),
    "not json": Reply(body=b"<html>oops</html>"),
    "html page": Reply(body=b"<html>oops</html>", content_type="text/html"),
    "no choices": Reply(body=b'{"id": "c", "object": "chat.completion", "created": 0, "model": "m", "choices": []}'),
    "no message": Reply(body=b'{"id": "c", "object": "chat.completion", "choices": [{"index": 0}]}'),
    "error object": Reply(body=b'{"error": {"message": "overloaded"}}'),
}


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_garbage_is_retried_then_scored_zero_and_counted(judge_server, make_batch, kind):
    server = judge_server(lambda n, body: GARBAGE[kind])
    with scorer_of(judge_cfg(server.url, retries=2, on_error="zero")) as scorer:
        result = scorer.score(make_batch(["a", "b"], meta=[{"question": "q"}] * 2))
    assert result.total.tolist() == [0.0, 0.0]
    assert result.errors == {"judge": 2}
    assert result.keep.tolist() == [True, True]
    assert server.requests == 2 * 3  # each sample: one try and two retries


def test_garbage_then_a_score_is_a_retried_success(judge_server):
    server = judge_server(lambda n, body: Reply(text="Score: 6") if n == 2 else Reply(text="hmm"))
    assert ask(make_judge(server.url, retries=2), ["a"]) == [0.6]
    assert server.requests == 3


def test_a_garbage_sample_drops_its_group_only(judge_server, make_batch):
    server = judge_server(lambda n, body: Reply(text="no idea" if "bad" in user_text(body) else "Score: 9"))
    with scorer_of(judge_cfg(server.url, retries=1, on_error="drop_group")) as scorer:
        result = scorer.score(make_batch(["ok", "bad", "ok", "ok"], meta=[{"question": "q"}] * 4,
                                         groups=[0, 0, 1, 1]))
    assert result.keep.tolist() == [False, False, True, True]
    assert result.errors == {"judge": 1}
    assert torch.allclose(result.total, torch.tensor([0.9, 0.0, 0.9, 0.9]))


def test_on_error_fail_names_the_judge_and_the_cause(judge_server, make_batch):
    server = judge_server(lambda n, body: Reply(text="meh"))
    with scorer_of(judge_cfg(server.url, retries=0, on_error="fail")) as scorer, \
            pytest.raises(UserError, match=r"reward 'judge' failed.*no score"):
        scorer.score(make_batch(["a"], meta=[{"question": "q"}]))


def test_a_judge_that_never_answers_times_out_within_its_bound(judge_server, make_batch):
    server = judge_server(lambda n, body: Reply(hang=True))
    timeout_s, retries = 0.5, 1
    with scorer_of(judge_cfg(server.url, timeout_s=timeout_s, retries=retries)) as scorer:
        start = time.monotonic()
        result = scorer.score(make_batch(["a", "b"], meta=[{"question": "q"}] * 2))
        elapsed = time.monotonic() - start
    assert result.errors == {"judge": 2} and result.total.tolist() == [0.0, 0.0]
    assert server.requests == 2 * (retries + 1)
    # Each try is cut at timeout_s; between tries a short backoff (0.25 s for the first retry).
    assert timeout_s * (retries + 1) <= elapsed < timeout_s * (retries + 1) + 0.25 + 1.0


def test_a_hanging_judge_error_says_timeout(judge_server):
    server = judge_server(lambda n, body: Reply(hang=True))
    got = ask(make_judge(server.url, timeout_s=0.3, retries=0), ["a"])
    assert isinstance(got[0], Exception) and "timeout_s=0.3" in str(got[0])


def test_a_judge_that_is_down_is_contained(make_batch):
    url = closed_port_url()
    start = time.monotonic()
    got = ask(make_judge(url, retries=1), ["a"])
    assert time.monotonic() - start < 5
    assert isinstance(got[0], Exception) and "unreachable" in str(got[0]) and url in str(got[0])
    with scorer_of(judge_cfg(url, retries=0, on_error="zero")) as scorer:
        result = scorer.score(make_batch(["a", "b"], meta=[{"question": "q"}] * 2))
    assert result.errors == {"judge": 2} and result.total.tolist() == [0.0, 0.0]


def test_a_server_error_once_then_a_score_is_retried(judge_server):
    server = judge_server(lambda n, body: Reply(status=500, body=b'{"error": "busy"}') if n == 0
                          else Reply(text="Score: 3"))
    judge = make_judge(server.url, retries=1)
    assert ask(judge, ["a"]) == [0.3]
    assert server.requests == 2
    assert judge.counts == {"requests": 2, "retries": 1}


def test_a_client_error_is_not_retried(judge_server):
    server = judge_server(lambda n, body: Reply(status=404, body=b'{"error": {"message": "no such model"}}'))
    got = ask(make_judge(server.url, retries=3), ["a"])
    assert isinstance(got[0], Exception) and "HTTP 404" in str(got[0])
    assert server.requests == 1  # a wrong model or URL does not get better by asking again


@pytest.mark.parametrize("concurrency", [1, 3])
def test_at_most_concurrency_requests_in_flight(judge_server, concurrency):
    server = judge_server(lambda n, body: Reply(text="Score: 1", delay_s=0.1))
    got = ask(make_judge(server.url, concurrency=concurrency), [f"c{i}" for i in range(6)])
    assert got == [0.1] * 6
    assert server.max_in_flight <= concurrency
    if concurrency > 1:
        assert server.max_in_flight > 1


# ----- set-up errors --------------------------------------------------------------------------------------
def test_a_missing_api_key_variable_is_a_user_error(monkeypatch):
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    with pytest.raises(UserError, match="NO_SUCH_JUDGE_KEY"):
        make_judge(closed_port_url(), api_key_env="NO_SUCH_JUDGE_KEY")


def test_without_openai_installed_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "openai", None)  # what `import openai` sees when it is not installed
    with pytest.raises(UserError, match=r"pip install 'rlpost\[agents\]'"):
        make_judge(closed_port_url())


def test_the_job_accepts_a_judge_entry():
    job = load_job("tiny", ['rewards=[{name: judge, url: "http://127.0.0.1:8000/v1", model: m, weight: 0.5}]'])
    (cfg,) = job.rewards
    assert isinstance(cfg, JudgeReward) and cfg.weight == 0.5 and cfg.label == "judge"
    data = job.model_dump(mode="json")
    assert isinstance(JobConfig.model_validate(data).rewards[0], JudgeReward)


@pytest.mark.parametrize(("entry", "message"), [
    ({"parse": r"Score: \d+"}, "has no group: put the score in parentheses"),
    ({"parse": r"Score: (\d+"}, "is not a regular expression"),
    ({"prompt": "rate {completion"}, "is not a valid template"),
    ({"prompt": "rate {} and {0}"}, "positional"),
    ({"url": "127.0.0.1:8000/v1"}, "http:// or https://"),
])
def test_the_job_rejects_a_bad_judge_entry_with_a_clear_message(entry, message):
    judge = {"name": "judge", "url": "http://127.0.0.1:8000/v1", "model": "m", **entry}
    with pytest.raises(UserError, match=message):
        load_job("tiny", [f"rewards=[{json.dumps(judge)}]"])
