"""Structured output: constrained outputs of a tiny random model parse and validate against their schemas (checked
by ``jsonschema``, independently of llguidance), match their regex or grammar, and a greedy constrained request
picks, at every step, the most likely token among those that keep its text inside the language (checked against
the model's own logits, with the candidates found by string prefixes rather than by llguidance)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from serve_fixtures import EOS_ID, TEXTS, tiny_config
from starlette.testclient import TestClient

from deepseek_moe import DeepSeekMoEForCausalLM
from deepseek_moe.serve.app import AppState, ServedModel, build_app
from deepseek_moe.serve.scheduler import Request, SamplingParams, Scheduler, SchedulerConfig, TokenEvent
from deepseek_moe.serve.structured import (
    MAX_FORMAT_CHARS,
    Constraint,
    GrammarCompiler,
    OutputFormat,
    allowed_tokens,
    allowed_tokens_by_shifts,
    apply_token_bitmask,
    apply_token_bitmask_reference,
    json_object_format,
)
from deepseek_moe.serve.text import ChatTemplate
from deepseek_moe.train.tokenizer import train_tokenizer

pytest.importorskip("llguidance", reason="structured output needs the structured extra (llguidance)")
jsonschema = pytest.importorskip("jsonschema", reason="the test extra's jsonschema validates the outputs")

OBJ = {"type": "object", "additionalProperties": False}
SCHEMAS: list[dict[str, Any]] = [
    # required fields, a bounded string and integer
    {**OBJ, "properties": {"name": {"type": "string", "maxLength": 12},
                           "age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"]},
    # an enum and an array of strings
    {**OBJ, "properties": {"color": {"enum": ["red", "green", "blue"]},
                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1,
                                    "maxItems": 3}}, "required": ["color", "tags"]},
    # nested objects, numbers, a boolean
    {**OBJ, "properties": {"point": {**OBJ, "properties": {"x": {"type": "number", "minimum": -10, "maximum": 10},
                                                           "y": {"type": "number", "minimum": -10, "maximum": 10}},
                                     "required": ["x", "y"]},
                           "ok": {"type": "boolean"}}, "required": ["point", "ok"]},
    # a top-level array of bounded integers
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 5},
    # an optional field beside a required one, and a nested array of objects
    {**OBJ, "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                           "note": {"type": "string", "maxLength": 8},
                           "items": {"type": "array", "maxItems": 2, "items": {
                               **OBJ, "properties": {"k": {"enum": ["a", "b"]}}, "required": ["k"]}}},
     "required": ["id", "items"]},
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return train_tokenizer(TEXTS, 400)


@pytest.fixture(scope="module")
def model(tokenizer: Any) -> DeepSeekMoEForCausalLM:
    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(tiny_config(tokenizer.get_vocab_size())).eval()
    with torch.no_grad():  # a sharper random model, as serve_fixtures builds it
        model.head.weight.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def compiler(tokenizer: Any, model: DeepSeekMoEForCausalLM) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, model.config.vocab_size, EOS_ID)


def scheduler(model: DeepSeekMoEForCausalLM) -> Scheduler:
    return Scheduler(model, SchedulerConfig(max_batch_size=16, max_batch_tokens=64, kv_cache_bytes=1 << 24))


def run(s: Scheduler, requests: list[tuple[list[int], SamplingParams, Constraint | None]]
        ) -> list[tuple[list[int], str]]:
    """Submit all at once (one busy batch), step until done: each request's tokens and finish reason."""
    events: list[list[Any]] = [[] for _ in requests]
    for (ids, params, constraint), sink in zip(requests, events, strict=True):
        s.submit(Request(ids, params, sink.append, constraint=constraint))
    while s.has_work():
        s.step()
    return [([e.token for e in ev if isinstance(e, TokenEvent)], ev[-1].reason) for ev in events]


def text_of(tokenizer: Any, tokens: list[int]) -> str:
    return str(tokenizer.decode([t for t in tokens if t != EOS_ID]))


def test_bitmask_matches_the_per_token_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    for V in (70, 96, 1):
        logits = torch.randn(3, V, generator=gen)
        words = torch.randint(-(2 ** 31), 2 ** 31 - 1, (3, (V + 31) // 32), generator=gen, dtype=torch.int64)
        bitmask = words.to(torch.int32)
        fast, slow = apply_token_bitmask(logits.clone(), bitmask), apply_token_bitmask_reference(logits, bitmask)
        assert torch.equal(fast, slow)
        assert torch.equal(allowed_tokens_by_shifts(bitmask, V), allowed_tokens(bitmask, V))  # the other path
        assert torch.isinf(fast).any() or V == 1  # the masks do mask something


def test_constrained_outputs_validate_against_their_schemas(model: DeepSeekMoEForCausalLM, tokenizer: Any,
                                                            compiler: GrammarCompiler) -> None:
    prompt = tokenizer.encode("The quick brown").ids
    plain = SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=frozenset({EOS_ID}))
    alone = run(scheduler(model), [(prompt, plain, None)])[0]
    batch: list[tuple[list[int], SamplingParams, Constraint | None]] = [(prompt, plain, None)]
    for seed in (1, 2):
        for schema in SCHEMAS:
            params = SamplingParams(max_tokens=200, temperature=1.0, seed=seed, stop_token_ids=frozenset({EOS_ID}))
            batch.append((prompt, params, compiler.constraint(
                OutputFormat("json_schema", json.dumps(schema), "response_format.json_schema.schema"))))
    results = run(scheduler(model), batch)
    assert results[0] == alone  # an unconstrained request in the batch is untouched by the others' masks
    outputs = []
    for (tokens, reason), schema in zip(results[1:], SCHEMAS * 2, strict=True):
        text = text_of(tokenizer, tokens)
        assert reason == "stop", (reason, text)  # the grammar ended it (with or without EOS)
        value = json.loads(text)
        jsonschema.validate(value, schema)
        outputs.append(value)
    assert len({json.dumps(v) for v in outputs}) > len(SCHEMAS)  # the seeds did sample different outputs


def test_json_object_gives_a_json_object(model: DeepSeekMoEForCausalLM, tokenizer: Any,
                                         compiler: GrammarCompiler) -> None:
    prompts = [tokenizer.encode(p).ids for p in ("def add(a, b):", "héllo wörld", "The quick brown fox")]
    batch: list[tuple[list[int], SamplingParams, Constraint | None]] = [
        (p, SamplingParams(max_tokens=120, temperature=t, seed=7, stop_token_ids=frozenset({EOS_ID})),
         compiler.constraint(json_object_format())) for p in prompts for t in (0.0, 1.0)]
    for tokens, reason in run(scheduler(model), batch):
        assert reason == "stop"
        assert isinstance(json.loads(text_of(tokenizer, tokens)), dict)


def test_regex_and_lark_grammar(model: DeepSeekMoEForCausalLM, tokenizer: Any, compiler: GrammarCompiler) -> None:
    email = r"[a-z]{2,6}@[a-z]{2,6}\.(com|org)"
    lark = 'start: item (", " item)*\nitem: "fox" | "dog" | NUMBER\nNUMBER: /[0-9]{1,3}/'
    prompt = tokenizer.encode("The quick brown").ids
    batch: list[tuple[list[int], SamplingParams, Constraint | None]] = []
    for seed in range(4):
        params = SamplingParams(max_tokens=60, temperature=1.0, seed=seed, stop_token_ids=frozenset({EOS_ID}))
        batch.append((prompt, params, compiler.constraint(OutputFormat("regex", email, "guided_regex"))))
        batch.append((prompt, params, compiler.constraint(OutputFormat("lark", lark, "guided_grammar"))))
    results = run(scheduler(model), batch)
    for i, (tokens, reason) in enumerate(results):
        text = text_of(tokenizer, tokens)
        pattern = email if i % 2 == 0 else r"(fox|dog|[0-9]{1,3})(, (fox|dog|[0-9]{1,3}))*"
        assert reason == "stop" and re.fullmatch(pattern, text), (reason, text)


def test_greedy_choice_is_the_best_token_the_grammar_allows(
        model: DeepSeekMoEForCausalLM, tokenizer: Any, compiler: GrammarCompiler) -> None:
    """At each step: every token the mask allows keeps the text a prefix of a word of the language (checked by
    string prefixes, not by llguidance; llguidance allows fewer, as it keeps forced text to its canonical
    tokens), and the scheduler's token is the most likely allowed one by the logits of a whole-sequence forward
    without the cache."""
    words = ["brown fox", "lazy dog", "quick", "jumps over", "quickly"]
    lark = "start: " + " | ".join(json.dumps(w) for w in words)
    fmt = OutputFormat("lark", lark, "guided_grammar")
    prompt = tokenizer.encode("The quick brown fox jumps over the").ids
    params = SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=frozenset({EOS_ID}))
    (tokens, reason), = run(scheduler(model), [(prompt, params, compiler.constraint(fmt))])
    assert reason == "stop" and text_of(tokenizer, tokens) in words
    pieces = [tokenizer.decode([t]) for t in range(tokenizer.get_vocab_size())]
    replay = compiler.constraint(fmt)
    bitmask = torch.zeros(1, (model.config.vocab_size + 31) // 32, dtype=torch.int32)
    with torch.no_grad():
        for n, token in enumerate(tokens):
            replay.fill(bitmask[0])
            logits = model(torch.tensor([prompt + tokens[:n]])).logits[0, -1]
            allowed = apply_token_bitmask(torch.zeros(1, logits.shape[0]), bitmask)[0].isfinite().nonzero()
            allowed_ids = allowed.flatten().tolist()
            so_far = text_of(tokenizer, tokens[:n])
            for t in allowed_ids:
                assert (t == EOS_ID and so_far in words) or any(w.startswith(so_far + pieces[t]) for w in words)
            assert token == max(allowed_ids, key=lambda t: logits[t].item())
            replay.consume(token)


@pytest.fixture(scope="module")
def client(model: DeepSeekMoEForCausalLM, tokenizer: Any) -> Iterator[TestClient]:
    state = AppState()
    s = scheduler(model)
    state.served = ServedModel(name="tiny", scheduler=s, tokenizer=tokenizer,
                               chat_template=ChatTemplate.for_checkpoint(None), stop_token_ids=frozenset({EOS_ID}))
    s.start()
    with TestClient(build_app(state)) as c:
        yield c
    s.shutdown(timeout=5)


CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "Describe a point."}]


def test_http_json_schema_json_object_and_regex(client: TestClient) -> None:
    schema = SCHEMAS[2]
    r = client.post(CHAT, json={"messages": HI, "seed": 3, "temperature": 1.0, "response_format": {
        "type": "json_schema", "json_schema": {"name": "point", "schema": schema, "strict": True}}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), schema)

    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 100, "temperature": 0,
                                             "response_format": {"type": "json_object"}})
    assert r.status_code == 200, r.text
    assert isinstance(json.loads(r.json()["choices"][0]["text"]), dict)

    chunks = []
    with client.stream("POST", CHAT, json={"messages": HI, "stream": True, "guided_regex": "(yes|no), [0-9]{2}"}) \
            as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:])["choices"][0]["delta"].get("content", ""))
    assert re.fullmatch("(yes|no), [0-9]{2}", "".join(chunks)), chunks


def test_n_choices_compile_once_and_each_follows_its_own_grammar_state(client: TestClient,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # One compile (and its probe) per request, not per choice; the choices' states are copies that advance
    # independently: a shared state would see three rows' tokens and refuse them, an unshared one from a stale
    # copy would let a choice end mid-object.
    calls: list[OutputFormat] = []
    compile_once = GrammarCompiler.constraint

    def counted(self: GrammarCompiler, fmt: OutputFormat) -> Constraint:
        calls.append(fmt)
        return compile_once(self, fmt)

    monkeypatch.setattr(GrammarCompiler, "constraint", counted)
    schema = SCHEMAS[0]
    r = client.post(CHAT, json={"messages": HI, "n": 3, "seed": 11, "temperature": 1.0, "response_format": {
        "type": "json_schema", "json_schema": {"name": "person", "schema": schema}}})
    assert r.status_code == 200, r.text
    assert len(calls) == 1
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1, 2]
    contents = [c["message"]["content"] for c in choices]
    for choice, content in zip(choices, contents, strict=True):
        assert choice["finish_reason"] == "stop", content
        jsonschema.validate(json.loads(content), schema)
    assert len(set(contents)) == 3, contents  # seeds 11, 12, 13 sampled different objects


@pytest.mark.parametrize("body,param,words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}}, "response_format.json_schema.schema", "uniqueItems"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     "response_format.json_schema.schema", "bogus"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "properties": {"a": {"not": {"type": "string"}}}}}}}, "response_format.json_schema.schema", "not"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "JSON schema object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "strictly": True}}},
     "response_format.json_schema.strictly", "not a field"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "xml"),
    ({"response_format": "json"}, "response_format", "type"),
    ({"guided_regex": "(unclosed"}, "guided_regex", "regular expression"),
    ({"guided_grammar": "start: missing_rule"}, "guided_grammar", "missing_rule"),
    ({"guided_grammar": ""}, "guided_grammar", "non-empty"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex", "only one"),
    # Hostile patterns: counted repetitions whose lexer blows up (bounded by LIMITS, refused by the probe), and
    # a pattern past MAX_FORMAT_CHARS.
    ({"guided_regex": "a{1000000}"}, "guided_regex", "limits"),
    ({"guided_regex": "(a{1000}){1000}"}, "guided_regex", "limits"),
    ({"guided_grammar": "start: /((a{100}){100}){100}/"}, "guided_grammar", "limits"),
    ({"guided_regex": "a" * (MAX_FORMAT_CHARS + 1)}, "guided_regex", f"at most {MAX_FORMAT_CHARS}"),
])
def test_bad_formats_are_a_400_naming_the_field(client: TestClient, body: dict[str, Any], param: str,
                                                words: str) -> None:
    r = client.post(CHAT, json={"messages": HI, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_openai_client_response_format(client: TestClient) -> None:
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)
    schema = SCHEMAS[1]
    chat = api.chat.completions.create(model="tiny", messages=HI, seed=5, temperature=1.0, response_format={
        "type": "json_schema", "json_schema": {"name": "tagged", "schema": schema}})
    jsonschema.validate(json.loads(chat.choices[0].message.content or ""), schema)


def test_preempted_constrained_requests_keep_their_grammar_state(model: DeepSeekMoEForCausalLM, tokenizer: Any,
                                                                 compiler: GrammarCompiler) -> None:
    """A cache too small for the batch preempts requests mid-output; recomputed, each constrained request gives
    the tokens it gives with room to spare (its matcher is not rewound: it already took the kept tokens)."""
    prompt = tokenizer.encode("The quick brown").ids

    def batch() -> list[tuple[list[int], SamplingParams, Constraint | None]]:
        return [(prompt, SamplingParams(max_tokens=80, temperature=1.0, seed=seed, stop_token_ids=frozenset({EOS_ID})),
                 compiler.constraint(OutputFormat("json_schema", json.dumps(schema), "schema")))
                for seed, schema in enumerate(SCHEMAS)]

    roomy = run(scheduler(model), batch())
    bytes_per_block = scheduler(model).bytes_per_token * 4
    tight = Scheduler(model, SchedulerConfig(max_batch_size=16, max_batch_tokens=64, block_size=4,
                                             kv_cache_bytes=bytes_per_block * 24))
    assert run(tight, batch()) == roomy
    assert tight.preemptions > 0


class Matcher:
    """An llguidance matcher stand-in that allows every token and refuses the first one it is given, with
    ``error`` (what llguidance says when a grammar runs past its limits mid-output, or something else)."""

    def __init__(self, error: str) -> None:
        self.error = error

    def unsafe_compute_mask_ptr(self, ptr: int, n_bytes: int) -> None:
        pass  # the row stays all ones: every token allowed

    def consume_token(self, token: int) -> bool:
        return False

    def get_error(self) -> str:
        return self.error

    def is_stopped(self) -> bool:
        return False


def test_a_grammar_past_its_limits_while_generating_is_the_requests_400(model: DeepSeekMoEForCausalLM) -> None:
    """A grammar that compiled but runs past llguidance's limits at a later token ends that request "invalid"
    naming its field (the app's 400), not a server error; any other grammar failure stays an "error"; the
    request beside them is untouched."""
    s = scheduler(model)
    params = SamplingParams(max_tokens=5)
    out = run(s, [([5, 6, 7], params, Constraint(Matcher("lexer error: too many expressions constructed"),
                                                  "guided_regex")),
                  ([5, 6, 7], params, Constraint(Matcher("parser error: token not allowed"), "guided_grammar")),
                  ([5, 6, 7], params, None)])
    assert out[0] == ([], "invalid") and out[1] == ([], "error") and len(out[2][0]) == 5
