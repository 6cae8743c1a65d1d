"""Device mesh and logical-axis sharding rules.

Params carry logical axis names through one table keyed by parameter name (``PARAM_AXES``), and one
rules table maps logical names to mesh axes (``DEFAULT_RULES``). A dimension that a mesh axis does
not divide falls back to replication, so the same rules run on 1 device, 8 fake CPU devices or a pod.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
DEFAULT_RULES = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
    "head_dim": None,
    "norm": None,
    "latents": None,
    "adapter_in": "fsdp",
}

# last path element(s) -> logical axes of the array (without a leading "layers" axis)
PARAM_AXES = {
    ("q_proj", "kernel"): ("embed", "heads"),
    ("k_proj", "kernel"): ("embed", "kv_heads"),
    ("v_proj", "kernel"): ("embed", "kv_heads"),
    ("o_proj", "kernel"): ("heads", "embed"),
    ("gate_proj", "kernel"): ("embed", "mlp"),
    ("up_proj", "kernel"): ("embed", "mlp"),
    ("down_proj", "kernel"): ("mlp", "embed"),
    ("embed_tokens", "embedding"): ("vocab", "embed"),
    ("lm_head", "kernel"): ("embed", "vocab"),
    ("fc1", "kernel"): ("adapter_in", "mlp"),
    ("fc1", "bias"): ("mlp",),
    ("fc2", "kernel"): ("mlp", "embed"),
    ("fc2", "bias"): ("embed",),
}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """A ``("data", "fsdp", "tensor")`` mesh with Auto axis types; ``-1`` takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh axes {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"{len(devices)} are available")
    arr = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(arr, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _axis_size(mesh: Mesh, axis) -> int:
    if axis is None:
        return 1
    axes = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(mesh.shape[a] for a in axes)


def spec_for(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=None) -> P:
    """PartitionSpec for an array with logical axes; non-dividing or reused mesh axes are replicated."""
    rules = DEFAULT_RULES if rules is None else rules
    used, out = set(), []
    for name, dim in zip(logical, shape):
        axis = rules.get(name) if name else None
        axes = () if axis is None else (axis if isinstance(axis, tuple) else (axis,))
        axes = tuple(a for a in axes if a not in used and mesh.shape.get(a, 1) > 1)
        if axes and dim % _axis_size(mesh, axes) == 0:
            used.update(axes)
            out.append(axes if len(axes) > 1 else axes[0])
        else:
            out.append(None)
    return P(*out)


def param_logical_axes(path: tuple[str, ...], ndim: int) -> tuple[str | None, ...]:
    """Logical axes of a param from its tree path (stacked layer params get a leading ``layers``)."""
    axes = PARAM_AXES.get(tuple(path[-2:]))
    if axes is None:
        axes = ("norm",) if path[-1] in ("scale", "bias") else (None,) * ndim
    if len(axes) < ndim:  # scanned layers: leading stacked axis
        axes = ("layers",) * (ndim - len(axes)) + tuple(axes)
    return tuple(axes[-ndim:]) if ndim else ()


def _path_names(path) -> tuple[str, ...]:
    return tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)


def param_shardings(params, mesh: Mesh, rules=None):
    """NamedShardings for a param (or abstract param) tree."""

    def one(path, x):
        names = _path_names(path)
        return NamedSharding(mesh, spec_for(param_logical_axes(names, x.ndim), x.shape, mesh, rules))

    return jax.tree_util.tree_map_with_path(one, params)


def batch_sharding(mesh: Mesh, ndim: int, rules=None, shape=None) -> NamedSharding:
    """Shard the leading (batch) axis over data x fsdp, replicate the rest."""
    logical = ("batch",) + (None,) * (ndim - 1)
    if shape is None:
        axis = (rules or DEFAULT_RULES)["batch"]
        return NamedSharding(mesh, P(axis, *([None] * (ndim - 1))))
    return NamedSharding(mesh, spec_for(logical, shape, mesh, rules))


def shard_params(params, mesh: Mesh, rules=None):
    """Place a (host) param tree onto the mesh."""
    return jax.device_put(params, param_shardings(params, mesh, rules))


def global_batch(local: np.ndarray, mesh: Mesh, rules=None):
    """A global array from this process's rows (multi-host: each process passes its own shard)."""
    sharding = batch_sharding(mesh, local.ndim, rules)
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local)
