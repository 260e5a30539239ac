"""A small GPT: a decoder-only transformer written from scratch.

    tokens -> tok_emb -> [Block] x n_layers -> final_norm -> lm_head -> logits

Each Block is pre-norm:  x = x + attn(attn_norm(x));  x = x + mlp(mlp_norm(x)).
Attention uses rotary position embeddings (RoPE) and separate bias-free q_proj, k_proj, v_proj and
output_proj linears (the LoRA stage swaps exactly these); the feed-forward is SwiGLU. The model returns
logits only: losses belong to the training code.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 512
    context_length: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 0  # SwiGLU hidden size; 0 means about 8/3 * d_model, rounded up to a multiple of 32
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"GPTConfig.d_model ({self.d_model}) must be n_heads ({self.n_heads}) times an even "
                             "head size (RoPE rotates pairs of channels)")
        if self.d_ff < 0:
            raise ValueError(f"GPTConfig.d_ff must be >= 0 (0 picks a default), got {self.d_ff}")
        if self.d_ff == 0:
            # SwiGLU has three matrices instead of two; 8/3 * d keeps the parameter count of a 4 * d MLP.
            self.d_ff = 32 * math.ceil(8 * self.d_model / 3 / 32)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(d) - known):
            raise ValueError(f"unknown model config keys {unknown}; known keys are {sorted(known)}")
        if missing := sorted(known - set(d)):
            raise ValueError(f"model config is missing keys {missing}")
        return cls(**d)


class RMSNorm(nn.Module):
    """x / rms(x) * weight: LayerNorm without the mean subtraction and the bias."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(head_dim: int, n_positions: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (n_positions, head_dim): channel pair (i, i + head_dim/2) turns at base^(-2i/head_dim)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(n_positions, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: (batch, heads, seq, head_dim) by position; cos/sin: (seq, head_dim). 'Rotate half'
    pairs channel i with i + head_dim/2, so the dot product q.k depends only on their distance."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of the tokens seen so far, per layer: (batch, heads, max_len, head_dim) each."""

    def __init__(self, n_layers, batch_size, n_heads, max_len, head_dim, device=None, dtype=torch.float32):
        shape = (batch_size, n_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0  # positions filled; advanced by GPT.forward after all layers have written

    @classmethod
    def for_model(cls, model: "GPT", batch_size: int, max_len: int | None = None, device=None, dtype=None):
        c = model.config
        p = next(model.parameters())
        return cls(c.n_layers, batch_size, c.n_heads, max_len or c.context_length, c.head_dim,
                   device or p.device, dtype or p.dtype)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (batch, heads, t, head_dim) after the cached prefix; return the whole prefix."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        d = config.d_model
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.output_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0):
        """x: (batch, seq, d_model); cos/sin: (seq, head_dim) for the positions of x."""
        b, t, d = x.shape
        # (batch, seq, d) -> (batch, heads, seq, head_dim)
        q, k, v = (proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        offset = 0
        if cache is not None:
            offset = cache.length
            k, v = cache.update(layer, k, v)
        if offset == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif t == 1:
            y = F.scaled_dot_product_attention(q, k, v)  # one new token sees the whole prefix
        else:
            # a chunk after a prefix: query i (at position offset + i) sees keys 0 .. offset + i
            mask = torch.ones(t, offset + t, dtype=torch.bool, device=x.device).tril(diagonal=offset)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.output_proj(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020, 'GLU Variants Improve Transformer')."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_tables(config.head_dim, config.context_length, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)  # derived from the config, not saved
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # Each block adds two residual branches to the stream; scaling their output projections by
        # 1/sqrt(2 * n_layers) keeps the stream's variance from growing with depth (GPT-2).
        for name, p in self.named_parameters():
            if name.endswith(("output_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module):
        # N(0, 0.02) for every matrix (GPT-2); RMSNorm gains start at 1 (set in RMSNorm).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """idx: (batch, seq) token ids -> logits (batch, seq, vocab). With a cache, idx continues the
        cached prefix: its positions start at cache.length."""
        start = cache.length if cache is not None else 0
        end = start + idx.shape[1]
        if end > self.config.context_length:
            raise ValueError(f"positions up to {end} exceed context_length {self.config.context_length}")
        cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]
        x = self.tok_emb(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i)
        if cache is not None:
            cache.length = end
        return self.lm_head(self.final_norm(x))

    def param_counts(self) -> dict[str, int]:
        """Parameters by component; a tied lm_head shares the embedding and counts 0."""
        def n(params):
            return sum(p.numel() for p in params)
        blocks = self.blocks
        counts = {
            "embedding": self.tok_emb.weight.numel(),
            "attention": n(p for b in blocks for p in b.attn.parameters()),
            "mlp": n(p for b in blocks for p in b.mlp.parameters()),
            "norms": n(p for b in blocks for m in (b.attn_norm, b.mlp_norm) for p in m.parameters())
            + n(self.final_norm.parameters()),
            "lm_head": 0 if self.config.tie_embeddings else self.lm_head.weight.numel(),
        }
        counts["total"] = sum(counts.values())
        return counts

    def flops_per_token(self) -> float:
        """Training FLOPs per token, forward + backward: 6 * N + 12 * n_layers * d_model * context_length,
        N the weights used in matmuls (the blocks' linears and lm_head; the embedding lookup is free).
        The second term is attention's scores and weighted sum (Kaplan et al. 2020; PaLM, appendix B)."""
        c = self.config
        n_matmul = sum(p.numel() for b in self.blocks for m in (b.attn, b.mlp) for p in m.parameters())
        n_matmul += c.vocab_size * c.d_model
        return 6 * n_matmul + 12 * c.n_layers * c.d_model * c.context_length


def pick_device(requested: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; a named device that is not there is an error."""
    available = ["cpu"] + ["cuda"] * torch.cuda.is_available() + ["mps"] * torch.backends.mps.is_available()
    if requested == "auto":
        return torch.device("cuda" if "cuda" in available else "mps" if "mps" in available else "cpu")
    if requested.split(":")[0] not in available:
        raise ValueError(f"--device {requested}: not available on this machine; available: {', '.join(available)} "
                         "(or auto)")
    return torch.device(requested)
