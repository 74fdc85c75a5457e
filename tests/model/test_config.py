"""LlamaConfig: the FFN rule, presets and their exact parameter counts, validation errors."""

import jax
import pytest

from llama2_jax.model.config import PRESETS, LlamaConfig, ffn_hidden_dim, get_config
from llama2_jax.model.llama import abstract_params

PUBLISHED_PARAM_COUNTS = {
    "7b": 6_738_415_616,
    "13b": 13_015_864_320,
    "34b": 33_743_970_304,
    "70b": 68_976_648_192,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAM_COUNTS))
def test_param_count_of_presets_without_allocating(name):
    cfg = get_config(name)
    shapes = abstract_params(cfg)  # jax.eval_shape: nothing is allocated
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(shapes))
    counted = sum(leaf.size for leaf in jax.tree.leaves(shapes))
    assert counted == PUBLISHED_PARAM_COUNTS[name]
    assert cfg.param_count() == PUBLISHED_PARAM_COUNTS[name]


def test_scanned_param_count_equals_unrolled():
    cfg = get_config("7b", scan_layers=True)
    counted = sum(leaf.size for leaf in jax.tree.leaves(abstract_params(cfg)))
    assert counted == PUBLISHED_PARAM_COUNTS["7b"]


@pytest.mark.parametrize("dim,multiple_of,multiplier,expected", [
    (4096, 256, None, 11008),
    (5120, 256, None, 13824),
    (8192, 256, 1.0, 22016),
    (8192, 4096, 1.3, 28672),  # 70B: 2/3 x 4 x 8192 = 21845 -> x1.3 = 28398 -> 28672
])
def test_ffn_width_rule(dim, multiple_of, multiplier, expected):
    assert ffn_hidden_dim(dim, multiple_of, multiplier) == expected


def test_presets_shapes():
    assert PRESETS["70b"].n_rep == 8 and PRESETS["70b"].head_dim == 128
    assert PRESETS["7b"].n_kv_heads == 32
    assert PRESETS["tiny"].param_count() < 10_000_000


def test_replace_rederives_ffn_width():
    cfg = get_config("7b").replace(dim=5120, n_heads=40, n_kv_heads=40)
    assert cfg.hidden_dim == 13824


def test_flops_per_token_formula():
    cfg = get_config("7b")
    n_matmul = cfg.param_count() - 32000 * 4096 - 65 * 4096
    assert cfg.flops_per_token(4096) == 6 * n_matmul + 12 * 32 * 4096 * 4096


@pytest.mark.parametrize("kwargs,field", [
    (dict(dim=100, n_heads=3), "dim"),
    (dict(n_heads=32, n_kv_heads=5), "n_heads"),
    (dict(n_layers=0), "n_layers"),
    (dict(dim=96, n_heads=32), "head_dim"),  # head_dim 3 is odd
    (dict(dtype="float64"), "dtype"),
    (dict(remat_policy="sometimes"), "remat_policy"),
    (dict(attention_impl="flash3"), "attention_impl"),
    (dict(norm_eps=0.0), "norm_eps"),
])
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LlamaConfig(**kwargs)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="n_head_kv"):
        LlamaConfig.from_dict({"dim": 64, "n_head_kv": 2})
    assert LlamaConfig.from_dict(get_config("tiny").to_dict()) == get_config("tiny")


def test_unknown_preset():
    with pytest.raises(ValueError, match="7B"):
        get_config("7B")
