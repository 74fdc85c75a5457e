"""LangChain's ChatOpenAI, a client nobody here wrote, against the server: invoke, stream, batch and logprobs give
what the openai client gets."""

import pytest

pytest.importorskip("fastapi")
langchain_openai = pytest.importorskip("langchain_openai")

from helpers.serving import client, served  # noqa: E402,F401  (the module's server and client)

MESSAGES = [("human", "Tell me a story.")]  # the module's model has a context of 32 tokens
OPENAI_MESSAGES = [{"role": "user", "content": "Tell me a story."}]


def test_chat_openai_invoke_stream_batch_and_logprobs(served, client):
    chat = langchain_openai.ChatOpenAI(model="tiny", base_url=served[0] + "/v1", api_key="none", temperature=0,
                                       max_tokens=6, max_retries=0)
    expected = client.chat.completions.create(model="tiny", messages=OPENAI_MESSAGES, max_tokens=6, temperature=0,
                                              logprobs=True)
    reply = chat.invoke(MESSAGES)
    assert reply.content == expected.choices[0].message.content
    assert reply.usage_metadata["output_tokens"] == 6
    assert "".join(chunk.content for chunk in chat.stream(MESSAGES)) == reply.content
    assert [r.content for r in chat.batch([MESSAGES, MESSAGES])] == [reply.content] * 2
    with_logprobs = chat.bind(logprobs=True).invoke(MESSAGES)
    logprobs = with_logprobs.response_metadata["logprobs"]["content"]
    assert [(e["token"], e["logprob"]) for e in logprobs] == \
        [(e.token, e.logprob) for e in expected.choices[0].logprobs.content]
