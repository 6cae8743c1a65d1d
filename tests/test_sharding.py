"""On 8 fake CPU devices the sharded forward equals the unsharded one."""

import jax
import jax.numpy as jnp
import numpy as np

from lclm_jax import config as C
from lclm_jax import sharding
from lclm_jax.modeling.attention import AttnMask
from lclm_jax.modeling.qwen3 import Qwen3ForCausalLM


def test_sharded_forward_equals_unsharded():
    assert len(jax.devices()) == 8, "conftest sets 8 fake CPU devices"
    cfg = C.tiny(vocab_size=256, tie_word_embeddings=False)
    model = Qwen3ForCausalLM(cfg)
    ids = np.random.default_rng(0).integers(0, 256, (8, 16)).astype(np.int32)
    params = model.init(jax.random.PRNGKey(0), ids[:1])["params"]

    def fwd(p, x):
        return model.apply({"params": p}, x, mask=AttnMask.make(x.shape[0], x.shape[1]))[0]

    ref = np.asarray(jax.jit(fwd)(params, ids))
    for dims in ({"data": 2, "fsdp": 2, "tensor": 2}, {"data": 1, "fsdp": 8, "tensor": 1}):
        mesh = sharding.make_mesh(**dims)
        sp = sharding.shard_params(params, mesh)
        # something really is split
        q = sp["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
        assert len({str(s.index) for s in q.addressable_shards}) > 1
        x = sharding.global_batch(ids, mesh)
        out = np.asarray(jax.jit(fwd)(sp, x))
        assert np.abs(out - ref).max() <= 1e-5, dims


def test_spec_falls_back_to_replication():
    mesh = sharding.make_mesh(data=1, fsdp=8, tensor=1)
    spec = sharding.spec_for(("vocab", "embed"), (10, 12), mesh)  # 12 % 8 != 0
    assert tuple(spec) == (None, None)
    spec = sharding.spec_for(("vocab", "embed"), (10, 16), mesh)
    assert tuple(spec) == (None, "fsdp")
