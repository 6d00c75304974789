"""Reading the official model.safetensors into our modules.

Tensors go straight from the file into the target dtype and device, one at a time, onto a
model built on the meta device: there is never a full-size float32 copy.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from moondream_server.model.config import MoondreamConfig
from moondream_server.model.hub import ModelLoadError
from moondream_server.model.net import MoondreamNet

PREFIX = "model."


def build_and_load(
    path: Path, config: MoondreamConfig, device: torch.device, dtype: torch.dtype
) -> MoondreamNet:

    with torch.device("meta"):
        net = MoondreamNet(config)
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
            state[name] = f.get_tensor(key).to(device=device, dtype=dtype).contiguous()
    net.load_state_dict(state, assign=True)
    net.text.init_rope(device)
    return net
