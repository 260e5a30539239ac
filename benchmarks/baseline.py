"""A plain GPT-2-style stack, the yardstick for microlm's training speed.

Everything here is a stock PyTorch building block, as GPT-2 and nanoGPT use them: learned position
embeddings, nn.LayerNorm, one fused nn.Linear for q, k and v, F.scaled_dot_product_attention with
is_causal, and a 4x GELU MLP. It has the same width, depth, heads and context as the model it is
measured against, so whatever separates the two is microlm's own choices: RMSNorm and QK-norm written
in Python, RoPE, three separate projections, SwiGLU and the document mask.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from microlm.model import GPTConfig


class BaselineBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln_1 = nn.LayerNorm(d_model)
        self.c_attn = nn.Linear(d_model, 3 * d_model)  # q, k and v in one matmul
        self.c_proj = nn.Linear(d_model, d_model)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, seq, d_model) -> the same shape."""
        b, t, d = x.shape
        # (batch, seq, 3 d) -> three of (batch, heads, seq, head_dim)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)
                   for z in self.c_attn(self.ln_1(x)).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln_2(x))


class BaselineGPT(nn.Module):
    """Token + learned position embeddings -> blocks -> LayerNorm -> tied lm_head. Returns logits."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.context_length, config.d_model)
        self.blocks = nn.ModuleList(BaselineBlock(config.d_model, config.n_heads) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied, as GPT-2 and microlm's default
        for m in self.modules():  # GPT-2's N(0, 0.02); the speed does not depend on it
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: (batch, seq) token ids -> logits (batch, seq, vocab)."""
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def flops_per_token(self) -> float:
        """The same count as GPT.flops_per_token (6 N + 12 n_layers d_model context), so both models'
        utilisation is measured with one ruler: N is the blocks' matmul weights plus lm_head."""
        c = self.config
        n_matmul = sum(m.weight.numel() for m in self.blocks.modules() if isinstance(m, nn.Linear))
        n_matmul += c.vocab_size * c.d_model
        return 6 * n_matmul + 12 * c.n_layers * c.d_model * c.context_length
