"""What real clients send, through the official `openai` client: chat log-probabilities (whole and streamed) in
OpenAI's chat shape, streamed completions log-probabilities, content-part lists, n samples sharing one prefill,
frequency / presence penalties and logit_bias as OpenAI documents them (checked against a host loop over the full
forward pass), stop strings, stream_options.include_usage, and every parameter the server does not implement
refused by name.

Covers llama2_jax.serve.requests and llama2_jax.serve.responses."""

import json

import jax
import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from helpers.generation import full_logits  # noqa: E402
from helpers.serving import MODEL_CFG, client, served  # noqa: E402,F401  (the module's server and client)

from llama2_jax.serve.responses import token_bytes, token_text  # noqa: E402
from llama2_jax.serve.text import reply_text  # noqa: E402
from llama2_jax.text import chat_format  # noqa: E402

STORY = [{"role": "user", "content": "Tell me a story."}]


def log_softmax_rows(params, tokens) -> np.ndarray:
    """[len(tokens), V] log-probabilities of the next token after each prefix of `tokens`."""
    return np.asarray(jax.nn.log_softmax(full_logits(params, MODEL_CFG, np.asarray([tokens]))[0], axis=-1))


def check_chat_logprobs(served, messages, content, entries, top):
    """The entries are the greedy tokens of the full forward pass, each with the model's log-probability and the
    `top` most likely tokens in order (bytes and log-probabilities), and their bytes spell the content."""
    _, params, tokenizer, _ = served
    prompt = chat_format.encode_dialog(tokenizer, messages)
    expected = reference_penalized_greedy(params, prompt, len(entries), 0.0, 0.0, {})
    assert [bytes(e.bytes) for e in entries] == [token_bytes(tokenizer, t) for t in expected]
    assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8", "replace").lstrip() == content.lstrip()
    log_probs = log_softmax_rows(params, prompt + expected)
    for position, (entry, token) in enumerate(zip(entries, expected)):
        row = log_probs[len(prompt) - 1 + position]
        np.testing.assert_allclose(entry.logprob, row[token], atol=1e-4)
        assert len(entry.top_logprobs) == top
        order = np.argsort(-row)[:top]
        np.testing.assert_allclose([t.logprob for t in entry.top_logprobs], row[order], atol=1e-4)
        assert [token_bytes(tokenizer, int(i)) for i in order] == [bytes(t.bytes) for t in entry.top_logprobs]


def test_completion_logprobs_streamed_equal_the_whole(served, client):
    for echo in (False, True):
        kwargs = dict(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=2, echo=echo)
        whole = client.completions.create(**kwargs).choices[0]
        chunks = list(client.completions.create(stream=True, **kwargs))
        choices = [c.choices[0] for c in chunks if c.choices]
        assert "".join(c.text for c in choices) == whole.text
        streamed = [c.logprobs for c in choices if c.logprobs]
        assert sum((lp.tokens for lp in streamed), []) == whole.logprobs.tokens
        assert sum((lp.token_logprobs for lp in streamed), []) == whole.logprobs.token_logprobs
        assert sum((lp.top_logprobs for lp in streamed), []) == whole.logprobs.top_logprobs
        assert sum((lp.text_offset for lp in streamed), []) == whole.logprobs.text_offset
        assert len(whole.logprobs.tokens) == 8 + (len(served[2].encode("Once upon a time", bos=True)) if echo else 0)


def test_content_part_lists_are_their_texts_joined(client):
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "Tell me"}, {"type": "text", "text": "a story."}]}]
    joined = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me\na story."}]
    ask = lambda messages: client.chat.completions.create(model="tiny", messages=messages, temperature=0,
                                                          max_tokens=1 if len(messages) > 1 else 8)
    a, b = ask(parts), ask(joined)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    a, b = ask(parts[1:]), ask(joined[1:])  # longer replies without the system prompt
    assert a.choices[0].message.content == b.choices[0].message.content
    image = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                          {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]
    with pytest.raises(openai.BadRequestError) as error:
        ask(image)
    assert error.value.body["param"] == "messages" and "'image_url'" in error.value.body["message"]


def test_n_samples_share_one_prefill(served, client):
    engine = served[3]
    one = client.completions.create(model="tiny", prompt="The cat sat on", max_tokens=8, temperature=1.0, seed=5)
    before = engine.prefills
    many = client.completions.create(model="tiny", prompt="The cat sat on", max_tokens=8, temperature=1.0, seed=5,
                                     n=4)
    assert engine.prefills == before + 1
    texts = [c.text for c in many.choices]
    assert [c.index for c in many.choices] == [0, 1, 2, 3] and texts[0] == one.choices[0].text
    assert len(set(texts)) == 4  # distinct draws
    assert many.usage.prompt_tokens == one.usage.prompt_tokens and many.usage.completion_tokens == 32
    again = client.completions.create(model="tiny", prompt="The cat sat on", max_tokens=8, temperature=1.0, seed=5,
                                      n=4)
    assert [c.text for c in again.choices] == texts
    greedy = client.chat.completions.create(model="tiny", messages=STORY, max_tokens=5, temperature=0, n=3)
    assert len({c.message.content for c in greedy.choices}) == 1
    stream = client.chat.completions.create(model="tiny", messages=STORY, max_tokens=5, temperature=0, n=3,
                                            stream=True)
    joined = {}
    for chunk in stream:
        for choice in chunk.choices:
            joined[choice.index] = joined.get(choice.index, "") + (choice.delta.content or "")
    assert joined == {i: greedy.choices[0].message.content for i in range(3)}
    two_prompts = client.completions.create(model="tiny", prompt=["The cat sat on", "Hello"], max_tokens=3,
                                            temperature=0, n=2)
    texts = [c.text for c in two_prompts.choices]
    assert texts[0] == texts[1] and texts[2] == texts[3] and texts[0] != texts[2]


def reference_penalized_greedy(params, prompt, steps, frequency, presence, bias) -> list[int]:
    """OpenAI's formula on the full forward pass: mu[j] - c[j] * frequency - (c[j] > 0) * presence + bias[j], c[j]
    the count of j among the tokens generated so far (not the prompt's); argmax."""
    tokens, generated = list(prompt), []
    for _ in range(steps):
        mu = full_logits(params, MODEL_CFG, np.asarray([tokens]))[0, -1].astype(np.float64)
        counts = np.bincount(generated, minlength=mu.shape[0])
        mu = mu - counts * frequency - (counts > 0) * presence
        for token, value in bias.items():
            mu[token] += value
        generated.append(int(np.argmax(mu)))
        tokens.append(generated[-1])
    return generated


def test_penalties_and_logit_bias_follow_openais_formula(served, client):
    _, params, tokenizer, _ = served
    prompt = tokenizer.encode("Once upon a time", bos=True)
    plain = reference_penalized_greedy(params, prompt, 10, 0.0, 0.0, {})
    favourite = plain[0]
    cases = [(0.0, 0.0, {}), (2.0, 0.0, {favourite: 12.0}), (0.0, 2.0, {favourite: 12.0}),
             (1.5, 0.5, {favourite: 14.0, plain[1]: -100.0}), (-1.0, -0.5, {})]
    for frequency, presence, bias in cases:
        expected = reference_penalized_greedy(params, prompt, 10, frequency, presence, bias)
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, logprobs=1,
                                        frequency_penalty=frequency, presence_penalty=presence,
                                        logit_bias={str(t): v for t, v in bias.items()})
        lp = out.choices[0].logprobs
        assert out.choices[0].text == reply_text(tokenizer, prompt, expected), (frequency, presence, bias)
        assert lp.tokens == [token_text(tokenizer, t) for t in expected]
        # the reported log-probabilities are the model's, not the adjusted ones
        rows = log_softmax_rows(params, prompt + expected)
        np.testing.assert_allclose(lp.token_logprobs, [rows[len(prompt) - 1 + i, t] for i, t in enumerate(expected)],
                                   atol=1e-4)
    assert reference_penalized_greedy(params, prompt, 10, 2.0, 0.0, {favourite: 12.0}) != plain  # the cases bite


def test_stop_as_a_string_or_a_list_in_chat(client):
    whole = client.chat.completions.create(model="tiny", messages=STORY, max_tokens=12, temperature=0)
    text = whole.choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 2]
    for value in (stop, [stop, "\u2603"]):
        cut = client.chat.completions.create(model="tiny", messages=STORY, max_tokens=12, temperature=0, stop=value)
        assert cut.choices[0].message.content == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_stream_options_include_usage_is_honoured(client):
    kwargs = dict(model="tiny", messages=STORY, max_tokens=4, temperature=0, stream=True)
    without = list(client.chat.completions.create(**kwargs))
    assert all(chunk.choices for chunk in without) and all(chunk.usage is None for chunk in without)
    with_usage = list(client.chat.completions.create(stream_options={"include_usage": True}, **kwargs))
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == 4
    assert all(chunk.usage is None for chunk in with_usage[:-1])
    completions = list(client.completions.create(model="tiny", prompt="Hi", max_tokens=3, temperature=0, stream=True,
                                                 stream_options={"include_usage": False}))
    assert all(chunk.usage is None for chunk in completions)
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="tiny", messages=STORY, stream_options={"include_usage": True})
    assert error.value.body["param"] == "stream_options"


CHAT_REFUSED = [("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
                ("tool_choice", "auto"), ("functions", [{"name": "f", "parameters": {}}]), ("function_call", "auto"),
                ("response_format", {"type": "json_object"}), ("parallel_tool_calls", True), ("store", True),
                ("audio", {"voice": "alloy", "format": "wav"}), ("reasoning_effort", "low")]
COMPLETION_REFUSED = [("best_of", 3), ("suffix", "The end.")]


@pytest.mark.parametrize("name,value", CHAT_REFUSED)
def test_unimplemented_chat_parameters_are_refused_by_name(client, name, value):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="tiny", messages=STORY, max_tokens=2, **{name: value})
    assert error.value.body["param"] == name and error.value.body["message"]


@pytest.mark.parametrize("name,value", COMPLETION_REFUSED)
def test_unimplemented_completion_parameters_are_refused_by_name(client, name, value):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model="tiny", prompt="Hi", max_tokens=2, **{name: value})
    assert error.value.body["param"] == name and error.value.body["message"]


def test_unknown_parameters_are_refused_as_openai_does(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model="tiny", prompt="Hi", max_tokens=2, extra_body={"top_k": 5})
    assert error.value.body["message"] == "Unrecognized request argument supplied: top_k"


@pytest.mark.parametrize("body", [
    {"n": None, "logprobs": False, "top_logprobs": None, "stream": False, "stop": None, "seed": None, "user": "u1",
     "tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "max_tokens": None,
     "frequency_penalty": None, "presence_penalty": None, "logit_bias": None, "stream_options": None,
     "temperature": None, "top_p": None, "store": False, "service_tier": "auto", "modalities": ["text"]},
    {"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
])
def test_values_that_mean_the_default_are_accepted(served, body):
    request = dict({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 2},
                   **body)
    response = httpx.post(served[0] + "/v1/chat/completions", content=json.dumps(request),
                          headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["logprobs"] is None and response.json()["usage"]["completion_tokens"] == 2
    completion = {"model": "tiny", "prompt": "Hi", "max_tokens": 2, "n": None, "logprobs": None, "best_of": 1,
                  "suffix": None, "echo": False}
    assert httpx.post(served[0] + "/v1/completions", json=completion).status_code == 200


BAD_VALUES = [
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": 1}, "logprobs"),
    ("/v1/completions", {"logprobs": 6}, "logprobs"),
    ("/v1/completions", {"logit_bias": {"x": 1}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"32000": 1}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"frequency_penalty": 2.5}, "frequency_penalty"),
    ("/v1/completions", {"presence_penalty": -3}, "presence_penalty"),
    ("/v1/completions", {"n": 0}, "n"),
    ("/v1/completions", {"n": 65}, "n"),  # more than the queue holds
    ("/v1/completions", {"temperature": 2.5}, "temperature"),
    ("/v1/completions", {"stream_options": {"include_usage": "yes"}, "stream": True}, "stream_options"),
]


@pytest.mark.parametrize("path,fields,param", BAD_VALUES)
def test_bad_values_are_400_naming_the_parameter(served, path, fields, param):
    body = {"model": "tiny", "max_tokens": 2, **fields}
    body.update({"messages": STORY} if "chat" in path else {"prompt": "Hi"})
    response = httpx.post(served[0] + path, json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
