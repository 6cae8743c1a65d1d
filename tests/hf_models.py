"""Tiny random Hugging Face Qwen3 models (torch) for parity tests."""

from __future__ import annotations

import torch
import transformers


def tiny_hf_config(tie=True, **kw):
    base = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6, rope_theta=5e6, max_position_embeddings=2048,
                tie_word_embeddings=tie, initializer_range=0.2, attn_implementation="eager")
    base.update(kw)
    return transformers.Qwen3Config(**base)


def randomize_norms(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


def make_causal_lm(path, tie=True, seed=0, **kw):
    torch.manual_seed(seed)
    model = randomize_norms(transformers.Qwen3ForCausalLM(tiny_hf_config(tie, **kw)).eval(), seed)
    model.save_pretrained(path, safe_serialization=True)
    return model


def make_backbone(path, seed=0, **kw):
    torch.manual_seed(seed)
    model = randomize_norms(transformers.Qwen3Model(tiny_hf_config(True, rope_theta=1e6, **kw)).eval(), seed)
    model.save_pretrained(path, safe_serialization=True)
    return model


def bidirectional_4d_mask(attention_mask):
    """Additive [B, 1, T, T] mask: keys that are padding are excluded, nothing causal."""
    m = attention_mask[:, None, None, :].to(torch.float32)
    t = attention_mask.shape[1]
    return ((1.0 - m) * torch.finfo(torch.float32).min).expand(-1, 1, t, t)
