"""Model-level invariances: remat policies, param layout, config round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lclm_jax import config as C
from lclm_jax.modeling.qwen3 import Qwen3ForCausalLM


def test_remat_policies_give_identical_gradients():
    cfg = C.tiny(vocab_size=128)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 12)), jnp.int32)
    params = Qwen3ForCausalLM(cfg).init(jax.random.PRNGKey(0), ids)["params"]

    def grads(policy):
        m = Qwen3ForCausalLM(cfg, remat_policy=policy)
        return jax.grad(lambda p: m.apply({"params": p}, ids)[0].sum())(params)

    ref = grads("none")
    for policy in ("full", "dots", "dots_no_batch"):
        g = grads(policy)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g, ref)
    with pytest.raises(ValueError, match="unknown remat policy"):
        Qwen3ForCausalLM(cfg, remat_policy="bogus").init(jax.random.PRNGKey(0), ids)


def test_config_round_trip_and_presets(tmp_path):
    cfg = C.qwen3_4b_instruct_2507()
    cfg.to_json_file(tmp_path / "config.json")
    assert C.Qwen3Config.from_json_file(tmp_path) == cfg
    assert C.qwen3_embedding_0_6b().head_dim == 128 and C.qwen3_embedding_0_6b().rope_theta == 1e6
    assert cfg.rope_theta == 5e6 and cfg.vocab_size == 151672
    # ~4.0B parameters with the tied head
    assert 3.9e9 < cfg.num_params() < 4.1e9
    with pytest.raises(C.ConfigError, match="multiple of num_key_value_heads"):
        C.tiny(num_attention_heads=3)
    with pytest.raises(C.ConfigError, match="pooling"):
        C.LCLMConfig(compression_ratio=4, encoder_window_size=16, pooling="max")
