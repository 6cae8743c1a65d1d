"""Qwen3 <-> Hugging Face safetensors through one declarative key-mapping table.

``QWEN3_TABLE`` lists every tensor of a Qwen3 backbone once: its HF name (``{i}`` = layer index), its
path in our param tree, and whether the array is transposed (torch ``Linear.weight`` is ``[out, in]``,
a Flax kernel ``[in, out]``). Reading and writing both walk this table, so they cannot disagree.

Reading is strict: every missing, unexpected or mis-shaped tensor is reported by name and the load
fails. Files are read tensor by tensor from a memory map (single file or sharded with an index).
"""

from __future__ import annotations

import json
import os
import shutil

import ml_dtypes
import numpy as np

from lclm_jax.checkpoint.safetensors_io import SafetensorsError, iter_model_files, open_tensors, save_file
from lclm_jax.config import Qwen3Config

# (hf name, tree path, transpose?, shape(config) -> expected HF shape)
_ATTN = lambda c: (c.num_attention_heads * c.head_dim, c.hidden_size)  # noqa: E731
_KV = lambda c: (c.num_key_value_heads * c.head_dim, c.hidden_size)  # noqa: E731
LAYER_TABLE = (
    ("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), True, _ATTN),
    ("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), True, _KV),
    ("self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), True, _KV),
    ("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), True,
     lambda c: (c.hidden_size, c.num_attention_heads * c.head_dim)),
    ("self_attn.q_norm.weight", ("self_attn", "q_norm", "scale"), False, lambda c: (c.head_dim,)),
    ("self_attn.k_norm.weight", ("self_attn", "k_norm", "scale"), False, lambda c: (c.head_dim,)),
    ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), True, lambda c: (c.intermediate_size, c.hidden_size)),
    ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), True, lambda c: (c.intermediate_size, c.hidden_size)),
    ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), True, lambda c: (c.hidden_size, c.intermediate_size)),
    ("input_layernorm.weight", ("input_layernorm", "scale"), False, lambda c: (c.hidden_size,)),
    ("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), False, lambda c: (c.hidden_size,)),
)
TOP_TABLE = (
    ("embed_tokens.weight", ("embed_tokens", "embedding"), False, lambda c: (c.vocab_size, c.hidden_size)),
    ("norm.weight", ("norm", "scale"), False, lambda c: (c.hidden_size,)),
)
LM_HEAD = ("lm_head.weight", ("lm_head", "kernel"), True, lambda c: (c.vocab_size, c.hidden_size))

NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
             "float16": np.dtype(np.float16)}


class CheckpointError(ValueError):
    """A checkpoint is missing tensors, has unexpected or mis-shaped ones, or is otherwise unreadable."""


def np_dtype(dtype) -> np.dtype:
    if isinstance(dtype, str):
        if dtype not in NP_DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; choose from {sorted(NP_DTYPES)}")
        return NP_DTYPES[dtype]
    return np.dtype(dtype)


def qwen3_entries(config: Qwen3Config, *, prefix: str, causal_lm: bool):
    """Every (hf_name, tree_path, layer_index or None, transpose, hf_shape) of a Qwen3 checkpoint."""
    out = []
    for name, path, tr, shape in TOP_TABLE:
        out.append((prefix + name, path, None, tr, shape(config)))
    for i in range(config.num_hidden_layers):
        for name, path, tr, shape in LAYER_TABLE:
            out.append((f"{prefix}layers.{i}.{name}", ("layers",) + path, i, tr, shape(config)))
    if causal_lm and not config.tie_word_embeddings:
        name, path, tr, shape = LM_HEAD
        out.append((name, path, None, tr, shape(config)))
    return out


def _tree_root(causal_lm: bool):
    return ("model",) if causal_lm else ()


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def read_qwen3(model_dir: str | os.PathLike, *, causal_lm: bool | None = None, dtype="float32",
               config: Qwen3Config | None = None):
    """Read a HF Qwen3 directory into ``(config, params)`` (numpy arrays in ``dtype``).

    ``causal_lm=None`` decides from ``config.json`` ``architectures``. Keys may carry the ``model.``
    prefix or not. The causal-LM tree is ``{"model": backbone, ["lm_head"]}``; the backbone tree is
    the backbone alone.
    """
    model_dir = os.fspath(model_dir)
    config = config or Qwen3Config.from_json_file(model_dir)
    if causal_lm is None:
        causal_lm = config.is_causal_lm
    target = np_dtype(dtype)
    try:
        files = iter_model_files(model_dir)
        tensors = dict(open_tensors(files))
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from e
    prefix = "model." if any(k.startswith("model.") for k in tensors) else ""
    entries = qwen3_entries(config, prefix=prefix, causal_lm=causal_lm)
    expected = {e[0] for e in entries}
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected)
    tied_head = causal_lm and config.tie_word_embeddings and "lm_head.weight" in unexpected
    if tied_head:  # a tied checkpoint may still carry the (identical) head; accept it only if identical
        unexpected.remove("lm_head.weight")
    if not causal_lm and "lm_head.weight" in unexpected:
        raise CheckpointError(f"{model_dir}: holds lm_head.weight but was read as a headless backbone")
    bad_shapes = [f"{n}: expected {list(s)}, found {list(tensors[n].shape(n))}"
                  for n, _, _, _, s in entries if n in tensors and tuple(tensors[n].shape(n)) != tuple(s)]
    if missing or unexpected or bad_shapes:
        lines = [f"{model_dir}: checkpoint does not match its config ({os.path.basename(files[0])}"
                 f"{' and other shards' if len(files) > 1 else ''})"]
        if missing:
            lines.append(f"  missing tensors ({len(missing)}): {', '.join(missing[:20])}"
                         + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            lines.append(f"  unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:20])}"
                         + (" ..." if len(unexpected) > 20 else ""))
        for b in bad_shapes[:20]:
            lines.append(f"  wrong shape {b}")
        raise CheckpointError("\n".join(lines))
    root = _tree_root(causal_lm)
    params: dict = {}
    stacked: dict = {}
    for name, path, layer, tr, shape in entries:
        arr = tensors[name].get(name)
        if not np.issubdtype(arr.dtype, np.floating) and arr.dtype != np.dtype(ml_dtypes.bfloat16):
            raise CheckpointError(f"{model_dir}: tensor {name} has non-float dtype {tensors[name].dtype_tag(name)}")
        arr = arr.T if tr else arr
        arr = arr.astype(target)
        full = (("lm_head", "kernel") if path[0] == "lm_head" else root + path)
        if layer is None:
            _set(params, full, np.ascontiguousarray(arr))
        else:
            buf = stacked.get(full)
            if buf is None:
                buf = stacked[full] = np.empty((config.num_hidden_layers,) + arr.shape, target)
            buf[layer] = arr
    for full, buf in stacked.items():
        _set(params, full, buf)
    if tied_head:
        head = tensors["lm_head.weight"].get("lm_head.weight").astype(target)
        if not np.array_equal(head, _get(params, root + ("embed_tokens", "embedding"))):
            raise CheckpointError(f"{model_dir}: config says tie_word_embeddings=true but lm_head.weight differs "
                                  "from model.embed_tokens.weight")
    return config, params


def write_qwen3(params, config: Qwen3Config, out_dir: str | os.PathLike, *, causal_lm: bool | None = None,
                dtype=None, max_shard_bytes: int = 5 * 1024 ** 3, prefix: str | None = None,
                extra_files_from: str | os.PathLike | None = None):
    """Write ``params`` as a HF Qwen3 directory (``config.json`` + safetensors, sharded with an index).

    ``dtype=None`` keeps each array's dtype. ``prefix`` defaults to ``model.`` for causal LMs and none
    for backbones (the official LCLM layout). ``extra_files_from`` copies tokenizer and generation
    files from another directory.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if causal_lm is None:
        causal_lm = config.is_causal_lm
    if prefix is None:
        prefix = "model." if causal_lm else ""
    root = _tree_root(causal_lm)
    tensors = {}
    for name, path, layer, tr, shape in qwen3_entries(config, prefix=prefix, causal_lm=causal_lm):
        full = (("lm_head", "kernel") if path[0] == "lm_head" else root + path)
        arr = np.asarray(_get(params, full))
        arr = arr[layer] if layer is not None else arr
        arr = arr.T if tr else arr
        if dtype is not None:
            arr = arr.astype(np_dtype(dtype))
        if tuple(arr.shape) != tuple(shape):
            raise CheckpointError(f"param for {name} has shape {list(arr.shape)}, config expects {list(shape)}")
        tensors[name] = np.ascontiguousarray(arr)
    write_sharded(tensors, out_dir, max_shard_bytes=max_shard_bytes)
    config.to_json_file(os.path.join(out_dir, "config.json"))
    if extra_files_from is not None:
        copy_side_files(extra_files_from, out_dir)
    return out_dir


SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")


def copy_side_files(src: str | os.PathLike, dst: str | os.PathLike):
    for name in SIDE_FILES:
        p = os.path.join(src, name)
        if os.path.exists(p) and os.path.abspath(p) != os.path.abspath(os.path.join(dst, name)):
            shutil.copyfile(p, os.path.join(dst, name))


def write_sharded(tensors: dict, out_dir: str, *, max_shard_bytes: int, stem: str = "model"):
    """One file when it fits in ``max_shard_bytes``, else HF-style shards plus ``*.index.json``."""
    for old in os.listdir(out_dir):
        if old.startswith(stem) and (old.endswith(".safetensors") or old.endswith(".safetensors.index.json")):
            os.remove(os.path.join(out_dir, old))
    total = sum(a.nbytes for a in tensors.values())
    shards, cur, cur_bytes = [], {}, 0
    for name in tensors:  # insertion order = table order, like HF state dicts
        nb = tensors[name].nbytes
        if cur and cur_bytes + nb > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[name] = tensors[name]
        cur_bytes += nb
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, f"{stem}.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    with open(os.path.join(out_dir, f"{stem}.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
