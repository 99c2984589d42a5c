"""The OpenAI-compatible routes, driven by the official `openai` client against a real local
Ray Serve app over loopback HTTP (one app for the module, with API keys): models, completions
and chat equal /v1/restyle, streaming equals the unstreamed text, per-request TWIST settings,
errors in OpenAI's shape naming the field, a streaming client that leaves frees its slot, and
OpenAI requests counted in /metrics."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from ray_nodes import free_port

from ray_twist.backbone import save_random_lora
from ray_twist.serve import ServeConfig, run

APP = "twist-openai"
KEY = "sk-test-0123456789"
SOURCES = ["k-a", "k-b", "k-c"]  # the keyed pool's
TEXTS = ["the old dog sleeps near the river", "a green sun", "she runs under the bridge"]
LIMITS = {"max_texts": 4, "max_input_tokens": 24, "max_new_tokens": 96,
          "default_max_new_tokens": 6, "max_rank": 3, "min_tau": 0.05,
          "max_body_bytes": 4096}  # fmt: skip
RETRIEVAL = {"rank": 2, "top_k": 2, "lambda": 0.7, "tau": 0.2}


@pytest.fixture(scope="module")
def url(keyed_pool, ray_session, tmp_path_factory):
    from ray import serve

    root = tmp_path_factory.mktemp("serve_openai")
    pool, base = keyed_pool
    keys = root / "keys.txt"
    keys.write_text(f"# api keys\n{KEY}\n")
    config = {
        "name": APP,
        "pool": pool,
        "styles": {"formal": save_random_lora(base, root / "formal", seed=11, rank=2)},
        "retrieval": RETRIEVAL,
        "limits": LIMITS,
        "batching": {"max_batch_rows": 16, "batch_wait_timeout_s": 0.05},
        "generator": {"num_replicas": 1, "num_cpus": 1},
        "ingress": {"num_replicas": 1, "num_cpus": 0.1},
        "http": {"host": "127.0.0.1", "port": free_port()},
        "auth": {"api_keys_file": str(keys)},
    }
    yield run(ServeConfig.model_validate(config))
    serve.delete(APP)
    serve.shutdown()


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def _restyle(http: httpx.Client, body: dict) -> dict:
    r = http.post("/v1/restyle", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("Generator", app_name=APP).stats.remote().result()


def test_models_list_every_name_a_request_may_use(client) -> None:
    ids = {m.id for m in client.models.list()}
    pool_forms = {f"{mode}:{s}" for mode in ("instance", "mixture") for s in SOURCES}
    assert ids == {"instance", "mixture", "formal", *SOURCES, *pool_forms}
    model = client.models.retrieve("instance:k-b")
    assert (model.id, model.owned_by) == ("instance:k-b", "ray-twist")
    assert model.model_extra["twist"] == {"mode": "instance", "style": "k-b"}


def test_completions_and_chat_equal_restyle(client, http) -> None:
    """Both routes restyle exactly as /v1/restyle does, with OpenAI's usage."""
    got = client.completions.create(model="formal", prompt=TEXTS[:2], max_tokens=5, temperature=0)
    ref = _restyle(http, {"texts": TEXTS[:2], "style": "formal", "max_new_tokens": 5})
    assert [c.text for c in got.choices] == ref["outputs"]
    assert [c.index for c in got.choices] == [0, 1]
    assert [c.finish_reason for c in got.choices] == ["length", "length"]  # no eos in 5
    assert got.usage.prompt_tokens == ref["usage"]["input_tokens"] > 0
    assert got.usage.completion_tokens == ref["usage"]["output_tokens"] > 0
    assert got.model_extra["twist"]["retrieval"] == [{"formal": 1.0}] * 2

    messages = [
        {"role": "system", "content": "ignored: a restyle has no instructions"},
        {"role": "user", "content": TEXTS[0]},
        {"role": "assistant", "content": "an earlier answer"},
        {"role": "user", "content": [{"type": "text", "text": TEXTS[2]}]},
    ]
    chat = client.chat.completions.create(model="instance:k-a", messages=messages)
    ref = _restyle(http, {"texts": [TEXTS[2]], "mode": "instance", "style": "k-a"})
    assert chat.choices[0].message.content == ref["outputs"][0]
    assert chat.choices[0].message.role == "assistant"
    assert chat.model_extra["twist"]["retrieval"] == ref["retrieval"]
    assert chat.usage.prompt_tokens == ref["usage"]["input_tokens"]


def test_streaming_equals_the_unstreamed_output(client) -> None:
    """Chunks arrive token by token; per choice they concatenate to the unstreamed text
    (greedy decoding), end with a finish_reason and, asked for, a usage chunk."""
    whole = client.completions.create(model="mixture", prompt=TEXTS, max_tokens=8, temperature=0)
    stream = client.completions.create(
        model="mixture", prompt=TEXTS, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    texts, deltas, reasons, usage = ["", "", ""], [0, 0, 0], [None] * 3, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            deltas[choice.index] += bool(choice.text)
            reasons[choice.index] = reasons[choice.index] or choice.finish_reason
    assert texts == [c.text for c in whole.choices]
    assert min(deltas) >= 4, deltas  # streamed as decoded, not in one piece
    assert reasons == ["length"] * 3
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens

    messages = [{"role": "user", "content": TEXTS[1]}]
    chat = client.chat.completions.create(model="formal", messages=messages, max_tokens=7)
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="formal", messages=messages, max_tokens=7, stream=True
        )
        if c.choices
    ]
    assert "".join(pieces) == chat.choices[0].message.content and len(pieces) > 4


def test_twist_settings_in_extra_body(client, http) -> None:
    """`twist` (extra_body) sets this request's rank, λ, τ, top-k and merge order: echoed in
    retrieval_applied, the weights keep top_k sources, and /v1/restyle with the same
    settings gives the same text."""
    twist = {"rank": 1, "lambda": 0.2, "tau": 0.5, "top_k": 1, "merge_order": "truncate_then_sum"}
    got = client.completions.create(
        model="instance:k-c", prompt=TEXTS[:2], extra_body={"twist": twist}
    )
    answer = got.model_extra["twist"]
    assert answer["retrieval_applied"] == {"lambda": 0.2, "levels": ["task", "instance"],
                                           "tau": 0.5, "top_k": 1, "rank": 1,
                                           "merge_order": "truncate_then_sum"}  # fmt: skip
    assert all(len(w) == 1 for w in answer["retrieval"])
    settings = {k: v for k, v in twist.items() if k != "merge_order"}
    ref = _restyle(http, {"texts": TEXTS[:2], "mode": "instance", "style": "k-c",
                          "merge_order": "truncate_then_sum", "twist": settings})  # fmt: skip
    assert [c.text for c in got.choices] == ref["outputs"]
    assert answer["retrieval"] == ref["retrieval"]
    default = client.completions.create(model="instance:k-c", prompt=TEXTS[:2])
    applied = default.model_extra["twist"]["retrieval_applied"]
    assert (applied["rank"], applied["top_k"], applied["tau"]) == (2, 2, 0.2)  # the server's


BAD: list[tuple[str, dict, str]] = [
    # (case, keyword arguments of completions.create (model/prompt defaulted), param named)
    ("tau below the server's minimum", {"extra_body": {"twist": {"tau": 0.01}}}, "twist.tau"),
    ("rank over the server's maximum", {"extra_body": {"twist": {"rank": 4}}}, "twist.rank"),
    ("lambda above one", {"extra_body": {"twist": {"lambda": 1.5}}}, "twist.lambda"),
    ("top_k over the pool", {"extra_body": {"twist": {"top_k": 4}}}, "twist.top_k"),
    ("unknown merge order", {"extra_body": {"twist": {"merge_order": "ties"}}},
     "twist.merge_order"),
    ("unknown twist key", {"extra_body": {"twist": {"q": 2}}}, "twist.q"),
    ("twist in adapted mode", {"model": "formal", "extra_body": {"twist": {"tau": 0.5}}},
     "twist"),
    ("max_tokens over the limit", {"max_tokens": 97}, "max_tokens"),
    ("max_tokens a string", {"max_tokens": "5"}, "max_tokens"),
    ("negative temperature", {"temperature": -1}, "temperature"),
    ("top_p above one", {"top_p": 1.5}, "top_p"),
    ("empty prompt in a list", {"prompt": ["ok", "  "]}, "prompt[1]"),
    ("prompt over the token limit", {"prompt": "word " * 40}, "prompt"),
    ("too many prompts", {"prompt": ["a b"] * 5}, "prompt"),
    ("prompt as token ids", {"prompt": [1, 2, 3]}, "prompt[0]"),
    ("prompt a number", {"prompt": 7}, "prompt"),
    ("n > 1", {"n": 2}, "n"),
    ("logprobs", {"logprobs": 2}, "logprobs"),
    ("stop", {"stop": ["."]}, "stop"),
    ("an unknown field", {"extra_body": {"colour": "red"}}, "colour"),
]  # fmt: skip


def test_bad_input_is_a_400_naming_the_field(client) -> None:
    for case, kwargs, param in BAD:
        kwargs = {"model": "instance", "prompt": "the dog runs", **kwargs}
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(**kwargs)
        error = caught.value
        assert (error.status_code, error.param) == (400, param), (case, error.body)
        assert error.type == "invalid_request_error" and error.message, (case, error.body)
    chat_bad = [
        ([{"role": "user", "content": "fine"}, {"role": "user", "content": " "}],
         "messages[1].content"),
        ([{"role": "system", "content": "no user message"}], "messages"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
         "messages[0].content[0]"),
        ([{"role": "oracle", "content": "hi"}], "messages[0].role"),
    ]  # fmt: skip
    for messages, param in chat_bad:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="formal", messages=messages)
        assert caught.value.param == param, caught.value.body
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="formal", messages=[{"role": "user", "content": "hi"}],
                                       tools=[{"type": "function", "function": {"name": "f"}}])  # fmt: skip
    assert caught.value.param == "tools"


def test_unknown_model_is_a_404_and_raw_errors_keep_the_shape(client, http) -> None:
    for model in ("gpt-4o", "instance:nope", "turbo:formal", "mixture:gpt"):
        with pytest.raises(openai.NotFoundError) as caught:
            client.completions.create(model=model, prompt="hi")
        assert (caught.value.param, caught.value.code) == ("model", "model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("formal:x")
    r = http.post("/v1/completions", content=b'{"model": "formal", "prompt": ["a"',
                  headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "body", r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = http.post("/v1/chat/completions", content=b"{}", headers={"content-type": "text/plain"})
    assert (r.status_code, r.json()["error"]["param"]) == (415, "content-type")
    r = http.post("/v1/completions", json={"model": "formal", "prompt": "a" * 5000})
    assert (r.status_code, r.json()["error"]["param"]) == (413, "body")


def test_api_keys(url) -> None:
    """The client's api_key is the bearer key; a wrong or missing one is a 401 in OpenAI's
    shape (the restyle routes keep theirs)."""
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.models.list()
    assert caught.value.code == "invalid_api_key"
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "formal", "messages": []})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{url}/v1/styles").json()["error"] == "unauthorized"


def test_a_client_that_leaves_mid_stream_frees_its_slot(http, client) -> None:
    """A stream asking for 96 tokens (the random model never ends early) is closed after its
    first chunk: the replica stops decoding its row at the next step (rows_stopped_early),
    holds no queued or running rows, and serves the next requests."""
    before = _stats()
    body = {"model": "formal", "prompt": TEXTS[0], "max_tokens": 96, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert '"text"' in first
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stats = _stats()
        if stats["streams_cancelled"] > before["streams_cancelled"] and not stats["running_rows"]:
            break
        time.sleep(0.2)
    assert stats["streams_cancelled"] == before["streams_cancelled"] + 1, stats
    assert stats["rows_stopped_early"] == before["rows_stopped_early"] + 1, stats
    assert (stats["running_rows"], stats["queued_rows"]) == (0, 0), stats
    assert stats["replica"] == before["replica"]
    got = client.completions.create(model="formal", prompt=TEXTS[:2], max_tokens=3)
    assert len(got.choices) == 2 and all(c.text for c in got.choices)


def _requests_counted(http: httpx.Client) -> dict[tuple[str, str, str], float]:
    """/metrics' request counter: (method, mode, status) → count, over replicas."""
    counted: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "ray_twist_requests_total":
                key = tuple(sample.labels[k] for k in ("method", "mode", "status"))
                counted[key] = counted.get(key, 0) + sample.value
    return counted


def test_openai_requests_are_counted_in_metrics(client, http) -> None:
    """Streamed and unstreamed OpenAI requests reach the generator's request counter (as
    restyle_stream, by mode and status); the node agents export every few seconds."""
    list(client.completions.create(model="mixture", prompt=TEXTS[0], max_tokens=3, stream=True))
    messages = [{"role": "user", "content": TEXTS[1]}]
    client.chat.completions.create(model="formal", messages=messages, max_tokens=3)
    wanted = [("restyle_stream", "mixture", "200"), ("restyle_stream", "adapted", "200")]
    deadline, counted = time.monotonic() + 30, {}
    while time.monotonic() < deadline:
        counted = _requests_counted(http)
        if all(counted.get(key, 0) >= 1 for key in wanted):
            break
        time.sleep(1)
    assert all(counted.get(key, 0) >= 1 for key in wanted), counted


def test_openapi_documents_the_routes(http) -> None:
    spec = http.get("/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/restyle"):
        assert path in spec["paths"], path
    body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]
    assert "messages" in body["application/json"]["schema"]["properties"]
