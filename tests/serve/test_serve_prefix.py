"""Prefix caching: prompts that share a prefix reuse its KV (fixed-size token blocks keyed by every token up to the
block's end, LRU, a fixed number of blocks), and greedy output (tokens and log-probabilities) is the same with and
without it — for prompts that hit, miss, overflow the pool, reach the end of the context, and n > 1.

Covers llama2_jax.serve.prefix_cache."""


import numpy as np
import pytest

pytest.importorskip("fastapi")

from helpers.serving import MODEL_CFG, complete, served  # noqa: E402,F401  (the module's server)

from llama2_jax.serve.engine import Engine, Finished  # noqa: E402
from llama2_jax.serve.prefix_cache import PrefixCache  # noqa: E402


def same(a: list[Finished], b: list[Finished]) -> None:
    assert [f.tokens for f in a] == [f.tokens for f in b]
    assert [f.text for f in a] == [f.text for f in b]
    for x, y in zip(a, b):
        np.testing.assert_allclose([e.logprob for e in x.logprobs], [e.logprob for e in y.logprobs], atol=1e-5)
        assert [list(e.top) for e in x.logprobs] == [list(e.top) for e in y.logprobs]


@pytest.fixture(scope="module")
def cached_engine(served):
    """An engine like the module's (same shapes: its compiled programs are shared) with a pool of 6 blocks of 4."""
    _, params, tokenizer, plain = served
    engine = Engine(params, MODEL_CFG, tokenizer, n_slots=plain.n_slots, max_queue=64, prefix_blocks=6,
                    prefix_block=4)
    engine.warm_up()
    engine.start()
    yield engine
    engine.stop()


def test_greedy_output_is_the_same_with_and_without_the_prefix_cache(served, cached_engine):
    plain, rng = served[3], np.random.default_rng(0)
    system = [1] + rng.integers(3, 32000, size=15).tolist()  # 16 shared tokens: 3 cacheable blocks + the rest
    prompts = [system + rng.integers(3, 32000, size=int(k)).tolist() for k in (1, 3, 5, 9)]
    prompts += [system[:9], system[:13] + [7, 8, 9]]  # shorter: within the shared prefix, and diverging mid-block
    prompts += [[1] + rng.integers(3, 32000, size=29).tolist()]  # 30 tokens: the prefill is moved back to fit
    for round_ in range(2):  # the second round hits what the first one cached
        before = cached_engine.prefix.hit_tokens
        same(complete(cached_engine, prompts), complete(plain, prompts))
        if round_:
            assert cached_engine.prefix.hit_tokens > before
    long = prompts[-1]
    same(complete(cached_engine, [long, long]), complete(plain, [long, long]))
    same(complete(cached_engine, [system + [5]], n=3, temperature=1.0, seed=4),
         complete(plain, [system + [5]], n=3, temperature=1.0, seed=4))
    assert len(cached_engine.prefix) <= 6


def test_sampled_output_and_echo_logprobs_are_the_same_too(served, cached_engine):
    plain = served[3]
    prompt = [1] + list(range(100, 120))
    for _ in range(2):
        a = complete(cached_engine, [prompt], temperature=0.9, seed=11, echo=True)
        b = complete(plain, [prompt], temperature=0.9, seed=11, echo=True)
        same(a, b)
        np.testing.assert_allclose([e.logprob or 0 for e in a[0].prompt_logprobs],
                                   [e.logprob or 0 for e in b[0].prompt_logprobs], atol=1e-5)


def test_blocks_are_keyed_by_the_whole_prefix():
    cache = PrefixCache(n_blocks=8, block=4)
    a = cache.digests([1, 2, 3, 4, 5, 6, 7, 8, 9])  # 2 full blocks before the last token
    assert len(a) == 2 and len(cache.digests([1, 2, 3, 4, 5, 6, 7, 8])) == 1  # the last token is never cached
    b = cache.digests([9, 2, 3, 4, 5, 6, 7, 8, 9])  # same second block after a different first one
    assert a[1] != b[1]
    assert cache.lookup(a) == [] and cache.allocate(a, keep=0) == [0, 1]
    assert cache.lookup(a) == [0, 1] and cache.lookup(b) == []
    assert cache.lookup(cache.digests([1, 2, 3, 4, 0, 0, 0, 0, 0])) == [0]  # the shared first block only
    assert (cache.hit_tokens, cache.lookup_tokens) == (12, 32)


def test_the_pool_is_bounded_and_evicts_the_least_recently_used():
    cache = PrefixCache(n_blocks=3, block=2)
    first, second = cache.digests([1, 2, 3, 4, 5]), cache.digests([7, 8, 9, 10, 11])
    assert cache.allocate(first, keep=0) == [0, 1]
    assert cache.lookup(first) == [0, 1]
    assert cache.allocate(second, keep=0) == [2, 0]  # a free block, then the oldest (first's block 0)
    assert len(cache) == 3 and cache.lookup(first) == []  # a prefix without its first block is a miss
    assert cache.lookup(second) == [2, 0]
    third = cache.digests([5, 5, 6, 6, 7, 7, 0])
    assert cache.allocate(third[1:], keep=2) == [1]  # never the 2 blocks just looked up: only what is not kept
    assert cache.lookup(second) == [2, 0]
    with pytest.raises(ValueError):
        PrefixCache(n_blocks=0, block=4)


def test_prefix_flags_and_the_pool_size(cached_engine, capsys):
    from llama2_jax.cli import serve as serve_cli
    from llama2_jax.serve.api import gauges
    from llama2_jax.serve.engine import kv_bytes_per_token, prefix_pool_blocks

    per_token = 2 * MODEL_CFG.n_layers * MODEL_CFG.n_kv_heads * MODEL_CFG.head_dim * 4  # float32
    assert kv_bytes_per_token(MODEL_CFG) == per_token
    assert prefix_pool_blocks(MODEL_CFG, 1, 16) == 2 ** 20 // (per_token * 16)
    for flag, message in [("--prefix_cache_mb=-1", "--prefix_cache_mb must be >= 0"),
                          ("--prefix_block=0", "--prefix_block must be >= 1")]:
        with pytest.raises(SystemExit):
            serve_cli.parse_args(["--checkpoint=c", "--tokenizer=t", flag])
        assert message in capsys.readouterr().err
    rows = {name: value for name, _, _, value in gauges(cached_engine)}
    assert rows["prefix_cache_hit_tokens_total"] == cached_engine.prefix.hit_tokens
    assert 0 <= rows["prefix_cache_hit_rate"] <= 1 and rows["prefix_cache_blocks"] <= 6
    assert "prefix cache 0.0 MiB (6 blocks of 4 tokens)" in cached_engine.memory_line()
