"""Region model: Fourier-feature encoders and MLP decoders for coordinates and sizes."""

from __future__ import annotations

import math

import torch
from torch import nn

from moondream_server.model.config import RegionConfig
from moondream_server.model.layers import MLP


class RegionModel(nn.Module):
    def __init__(self, config: RegionConfig) -> None:
        super().__init__()
        self.config = config
        self.coord_features = nn.Parameter(torch.zeros(1, config.coord_feat_dim // 2))
        self.coord_encoder = nn.Linear(config.coord_feat_dim, config.dim)
        self.coord_decoder = MLP(config.dim, config.inner_dim, config.coord_out_dim)
        self.size_features = nn.Parameter(torch.zeros(2, config.size_feat_dim // 2))
        self.size_encoder = nn.Linear(config.size_feat_dim, config.dim)
        self.size_decoder = MLP(config.dim, config.inner_dim, config.size_out_dim)

    @property
    def coord_bins(self) -> int:
        return self.config.coord_out_dim

    def encode_coordinate(self, coords: torch.Tensor) -> torch.Tensor:
        """[..., 1] values in [0, 1] -> [..., dim] input embeddings."""
        return self.coord_encoder(_fourier(coords, self.coord_features))  # type: ignore[no-any-return]

    def encode_size(self, sizes: torch.Tensor) -> torch.Tensor:
        """[..., 2] (width, height) fractions -> [..., dim] input embeddings."""
        return self.size_encoder(_fourier(sizes, self.size_features))  # type: ignore[no-any-return]

    def decode_coordinate(self, hidden: torch.Tensor) -> torch.Tensor:
        """Raw hidden states [..., dim] -> coordinate bin logits [..., bins]."""
        return self.coord_decoder(hidden)  # type: ignore[no-any-return]

    def decode_size(self, hidden: torch.Tensor) -> torch.Tensor:
        """Raw hidden states [..., dim] -> size logits [..., 2, bins] (width row, height row)."""
        out = self.size_decoder(hidden)
        return out.view(*out.shape[:-1], 2, -1)  # type: ignore[no-any-return]


def _fourier(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    f = 2 * math.pi * x @ freqs
    return torch.cat([f.cos(), f.sin()], dim=-1)


def size_from_bin(bins: torch.Tensor) -> torch.Tensor:
    """Log-scale size bins -> fractions in [2^-10, 1], computed as the reference does (torch.pow)."""
    return torch.pow(2.0, (bins.float() / 1023.0) * 10.0 - 10.0)
