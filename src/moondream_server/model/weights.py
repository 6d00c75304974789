"""Reading the official model.safetensors into our modules.

Tensors go straight from the file into the target dtype and device, one at a time, onto a
model built on the meta device. Linear weights that will be repacked anyway (float16 storage on
the CPU) can stay in the file's dtype until then, so no full-size float32 copy ever exists.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from moondream_server.model.config import MoondreamConfig
from moondream_server.model.hub import ModelLoadError
from moondream_server.model.net import MoondreamNet

PREFIX = "model."


def linear_weight_names(net: nn.Module) -> set[str]:
    """State-dict names of the weights of every ``nn.Linear`` under `net`."""
    return {f"{name}.weight" for name, m in net.named_modules() if isinstance(m, nn.Linear)}


def build_and_load(
    path: Path,
    config: MoondreamConfig,
    device: torch.device,
    dtype: torch.dtype,
    keep_stored_dtype: Callable[[nn.Module], set[str]] | None = None,
) -> MoondreamNet:
    """Build the network and fill it from `path`.

    ``keep_stored_dtype(net)`` names tensors to leave in the file's dtype (the caller converts
    them later); everything else is converted to `dtype` on reading.
    """
    with torch.device("meta"):
        net = MoondreamNet(config)
    keep = keep_stored_dtype(net) if keep_stored_dtype is not None else set()
    expected = {name: tuple(p.shape) for name, p in net.state_dict().items()}
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ModelLoadError(f"{path} is not a readable safetensors file: {e}") from e
    with handle as f:
        stored = {key.removeprefix(PREFIX): key for key in f.keys()}  # noqa: SIM118
        missing = sorted(set(expected) - set(stored))
        unexpected = sorted(set(stored) - set(expected))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(
                    f"missing {len(missing)} tensors (e.g. {', '.join(PREFIX + m for m in missing[:3])})"
                )
            if unexpected:
                examples = ", ".join(stored[u] for u in unexpected[:3])
                parts.append(f"unexpected {len(unexpected)} tensors (e.g. {examples})")
            raise ModelLoadError(f"{path} does not match the Moondream2 layout: " + "; ".join(parts))
        state: dict[str, torch.Tensor] = {}
        for name, key in stored.items():
            shape = tuple(f.get_slice(key).get_shape())
            if shape != expected[name]:
                raise ModelLoadError(
                    f"{path}: tensor {key} has shape {list(shape)}, the config expects {list(expected[name])}"
                    " (is config.json the one that belongs to these weights?)"
                )
            tensor = f.get_tensor(key)
            target = tensor.dtype if name in keep and tensor.is_floating_point() else dtype
            state[name] = tensor.to(device=device, dtype=target).contiguous()
    net.load_state_dict(state, assign=True)
    net.text.init_rope(device)
    return net
