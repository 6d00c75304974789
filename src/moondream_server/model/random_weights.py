"""Random checkpoints in the official file layout, for tests and benchmarks.

Weights cannot be downloaded everywhere (CI, air-gapped machines), but the compute of the real
model only depends on its shapes: a random checkpoint of the full-size config costs exactly as
much to run. Tests use tiny configs written the same way.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from moondream_server.model.config import MoondreamConfig
from moondream_server.model.net import MoondreamNet
from moondream_server.model.weights import PREFIX


def random_state(
    config: MoondreamConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """Official key names -> random tensors with roughly sane scales (LayerNorm weights near 1)."""
    with torch.device("meta"):
        net = MoondreamNet(config)
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, p in sorted(net.state_dict().items()):
        shape = tuple(p.shape)
        if name.endswith(("ln.weight", "ln1.weight", "ln2.weight", "post_ln.weight")):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            t = 0.05 * torch.randn(shape, generator=gen)
        elif name.endswith("weight") and len(shape) == 2:
            t = torch.randn(shape, generator=gen) / shape[1] ** 0.5
        elif name == "text.wte":
            t = torch.randn(shape, generator=gen)
        else:  # pos_emb, Fourier features
            t = torch.randn(shape, generator=gen) * (2.0 if "features" in name else 0.1)
        state[PREFIX + name] = t.to(dtype)
    return state


def write_checkpoint(
    folder: str | Path,
    config: MoondreamConfig,
    tokenizer_json: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    never_stop: bool = False,
) -> Path:
    """Write model.safetensors + config.json + tokenizer.json into `folder`.

    never_stop makes end-of-text (id 0) unreachable, so generation always runs to its token
    budget and detection to its object cap: benchmark runs then have a fixed length.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = random_state(config, seed, dtype)
    bias = state[PREFIX + "text.lm_head.bias"]
    # Favour ids the tokenizer knows (past the 10 special ids), so decoded text is not empty.
    known = Tokenizer.from_file(str(tokenizer_json)).get_vocab_size()
    bias[10 : min(known, bias.shape[0])] += 4.0
    if never_stop:
        bias[config.tokenizer.eos_id] = -1e4
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    shutil.copyfile(tokenizer_json, folder / "tokenizer.json")
    return folder
