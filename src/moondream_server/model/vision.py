"""Vision encoder (SigLIP-style ViT), crop reconstruction, pooling and projection."""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn
from torch.nn import functional as F

from moondream_server.model.config import VisionConfig
from moondream_server.model.layers import MLP


class VisionAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        # [q | k | v], each split into contiguous heads.
        qkv = self.qkv(x).view(n, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        # One copy into head-major order: the CPU's attention kernel is ~12% faster on contiguous
        # heads than on the strided view, which pays for the copy several times over.
        q, k, v = qkv.contiguous() if x.device.type == "cpu" else qkv
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))  # type: ignore[no-any-return]


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.enc_dim)
        self.attn = VisionAttention(config.enc_dim, config.enc_n_heads)
        self.ln2 = nn.LayerNorm(config.enc_dim)
        self.mlp = MLP(config.enc_dim, config.enc_ff_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))  # type: ignore[no-any-return]


class VisionModel(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        grid = config.grid
        self.patch_emb = nn.Linear(config.enc_patch_size**2 * config.in_channels, config.enc_dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, grid * grid, config.enc_dim))
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.enc_n_layers))
        self.post_ln = nn.LayerNorm(config.enc_dim)
        self.proj_mlp = MLP(2 * config.enc_dim, config.proj_inner_dim, config.proj_out_dim)

    def normalize(self, crops: NDArray[np.uint8]) -> torch.Tensor:
        """uint8 [N, S, S, 3] -> [N, 3, S, S] in the model dtype, scaled to [-1, 1] in that dtype."""
        # The uint8 pixels travel as they are (a quarter of the float bytes); the channel move is
        # a view here and a copy on the device (``encode`` reshapes), not a host-side transpose.
        x = torch.from_numpy(np.ascontiguousarray(crops)).to(self.pos_emb.device)
        x = x.to(self.pos_emb.dtype).div_(255.0).sub_(0.5).div_(0.5)
        return x.permute(0, 3, 1, 2)

    def encode(self, crops: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] normalised crops -> [N, grid*grid, enc_dim] features (after post_ln)."""
        n, c, _, _ = crops.shape
        p, g = self.config.enc_patch_size, self.config.grid
        # Patch vector order: channel, then pixel row, then pixel column.
        x = crops.reshape(n, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, c * p * p)
        x = self.patch_emb(x) + self.pos_emb
        for block in self.blocks:
            x = block(x)
        return self.post_ln(x)  # type: ignore[no-any-return]

    def pool_local(self, local: torch.Tensor, tiling: tuple[int, int]) -> torch.Tensor:
        """Stitch local crop features [rows*cols, g*g, C] into one grid, then pool to [g*g, C]."""
        g = self.config.grid
        grid = reconstruct(local.view(-1, g, g, local.shape[-1]), tiling, self.config.overlap_margin)
        pooled = F.adaptive_avg_pool2d(grid.permute(2, 0, 1), (g, g))
        return pooled.permute(1, 2, 0).reshape(g * g, -1)

    def project(self, global_features: torch.Tensor, pooled_local: torch.Tensor) -> torch.Tensor:
        """[g*g, C] global and pooled local features -> [g*g, proj_out_dim] image embeddings."""
        return self.proj_mlp(torch.cat([global_features, pooled_local], dim=-1))  # type: ignore[no-any-return]

    def embed(self, features: torch.Tensor, tiling: tuple[int, int]) -> torch.Tensor:
        """Encoder output of one image's crops (global first) -> its image embeddings."""
        return self.project(features[0], self.pool_local(features[1:], tiling))


def reconstruct(tiles: torch.Tensor, tiling: tuple[int, int], margin: int) -> torch.Tensor:
    """Place overlapping tiles [rows*cols, g, g, C] into one [H, W, C] grid.

    Each tile contributes its interior; tiles on the outer border also keep their outer margin.
    """
    rows, cols = tiling
    _, g, _, channels = tiles.shape
    window = g - 2 * margin
    out = tiles.new_zeros(rows * window + 2 * margin, cols * window + 2 * margin, channels)
    for k in range(rows * cols):
        ty, tx = divmod(k, cols)
        y0 = 0 if ty == 0 else margin
        y1 = g if ty == rows - 1 else g - margin
        x0 = 0 if tx == 0 else margin
        x1 = g if tx == cols - 1 else g - margin
        out[ty * window + y0 : ty * window + y1, tx * window + x0 : tx * window + x1] = tiles[k, y0:y1, x0:x1]
    return out
