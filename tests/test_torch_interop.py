"""A checkpoint written by lclm-jax loads in transformers / torch and gives the same outputs."""

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

import lclm_jax
from tests.conftest import GOLDEN

CK = GOLDEN / "mean_bidir_cr8_w32_o8_attnmlp" / "checkpoint"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    lm = lclm_jax.load(CK, dtype="float32")
    out = tmp_path_factory.mktemp("saved") / "ck"
    lm.save_pretrained(out)
    return lm, out


def test_transformers_decoder_matches(saved):
    lm, out = saved
    hf = transformers.Qwen3ForCausalLM.from_pretrained(out / "decoder", torch_dtype=torch.float32,
                                                       attn_implementation="eager").eval()
    prompt = "A plain prompt without memory spans, just words."
    ids = lm.processor.process(prompt).input_ids
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids.astype(np.int64))[None]).logits[0].numpy()
    assert np.abs(lm.logits(prompt) - ref).max() <= 1e-4


def test_transformers_encoder_matches(saved):
    lm, out = saved
    hf = transformers.Qwen3Model.from_pretrained(out / "encoder", torch_dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    ids = np.arange(3, 40, dtype=np.int64)[None]
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).last_hidden_state[0].numpy()
    ours = lclm_jax.load_qwen3(out / "encoder").hidden_states(ids)[0]
    assert np.abs(ours - ref).max() <= 1e-4


def test_adapter_loads_strictly_in_torch(saved):
    """The adapter file has exactly the reference Adapter's state-dict keys and shapes (strict load)."""
    lm, out = saved
    enc = lm.model.encoder_config
    layer = transformers.models.qwen3.modeling_qwen3.Qwen3DecoderLayer(
        transformers.Qwen3Config(hidden_size=enc.hidden_size, intermediate_size=enc.intermediate_size,
                                 num_attention_heads=enc.num_attention_heads,
                                 num_key_value_heads=enc.num_key_value_heads, head_dim=enc.head_dim), 0)
    block = torch.nn.Module()
    block.decoder_layer = layer
    module = torch.nn.Module()
    module.norm = torch.nn.RMSNorm(enc.hidden_size, eps=1e-6)
    module.fc1 = torch.nn.Linear(enc.hidden_size, lm.model.decoder_config.hidden_size)
    module.fc2 = torch.nn.Linear(lm.model.decoder_config.hidden_size, lm.model.decoder_config.hidden_size)
    module.attention_layers = torch.nn.ModuleList([block])
    state = safetensors.torch.load_file(str(out / "adapter" / "adapter.safetensors"))
    module.load_state_dict(state, strict=True)  # raises on any missing/unexpected/mis-shaped key
