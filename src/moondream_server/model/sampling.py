"""Token choice: greedy at temperature 0, else temperature + top-p (nucleus) sampling."""

from __future__ import annotations

import torch

from moondream_server.model.params import TextSettings as TextSettings  # its former home


def choose(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None
) -> int:
    """Pick the next token id from float logits [vocab]."""
    if temperature == 0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True)
    # Drop every entry whose cumulative mass *before* it already exceeds top_p.
    sorted_probs[(torch.cumsum(sorted_probs, dim=-1) - sorted_probs) > top_p] = 0.0
    sorted_probs /= sorted_probs.sum()
    pick = torch.multinomial(sorted_probs, 1, generator=generator)
    return int(order[pick].item())
