"""A small GPT: a decoder-only transformer written from scratch.

    tokens -> tok_emb -> [Block] x n_layers -> final_norm -> lm_head -> logits

Each Block is pre-norm:  x = x + attn(attn_norm(x));  x = x + mlp(mlp_norm(x)). With conv_kernel > 0
(off by default) a ShortConv mixes the last few positions into each input of attn and mlp.
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
    # With eot_id >= 0, a token attends only to its own document, which starts at an eot_id token:
    # packed stories then cannot see each other, so none has to learn to ignore the one before.
    eot_id: int = -1
    qk_norm: bool = True  # RMS-normalise queries and keys per head (see CausalSelfAttention)
    # Attention scores are q.k * attn_scale / sqrt(head_dim). With QK-norm, q.k / sqrt(head_dim) is at
    # most sqrt(head_dim) (about 5.7 here) times the norms' gains, too flat to pick one token out of a
    # story until the gains grow; 2 lets heads look things up sooner (results/HISTORY.md).
    attn_scale: float = 2.0
    # With conv_kernel = k > 0, each block mixes the last k positions into the inputs of its attention
    # and of its feed-forward, channel by channel (see ShortConv). Off by default for now: on this world
    # 8 met the 95% valid-story target on all four seeds tried (the plain model on one), but its loop
    # over the taps trains 12% slower (results/HISTORY.md: "Short convolutions, four seeds").
    conv_kernel: int = 0

    def __post_init__(self):
        for f in fields(self):  # a JSON file or a flag can carry a string where a number belongs
            v, want = getattr(self, f.name), {"int": int, "float": (int, float), "bool": bool}[str(f.type)]
            if not isinstance(v, want) or (want is not bool and isinstance(v, bool)):
                raise ValueError(f"GPTConfig.{f.name} must be of type {f.type}, got {v!r}")
        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("rope_base", "norm_eps", "attn_scale"):
            if not 0 < getattr(self, name) < math.inf:  # written so that NaN fails too
                raise ValueError(f"GPTConfig.{name} must be a finite number > 0, got {getattr(self, name)}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"GPTConfig.d_model ({self.d_model}) must be n_heads ({self.n_heads}) times an even "
                             "head size (RoPE rotates pairs of channels), e.g. d_model = 2 * n_heads * k")
        if not -1 <= self.eot_id < self.vocab_size:
            raise ValueError(f"GPTConfig.eot_id must be -1 (no document masking) or a token id in "
                             f"[0, {self.vocab_size}), got {self.eot_id}")
        if self.conv_kernel < 0:
            raise ValueError(f"GPTConfig.conv_kernel must be >= 0 (0: no convolution), got {self.conv_kernel}")
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
        d = {"conv_kernel": 0, **d}  # saved before ShortConv existed: those models have none
        if unknown := sorted(set(d) - known):
            raise ValueError(f"unknown model config keys {unknown}; known keys are {sorted(known)}")
        if missing := sorted(known - set(d)):
            raise ValueError(f"model config is missing keys {missing}")
        return cls(**d)


class RMSNorm(nn.Module):
    """x / rms(x) * weight: LayerNorm without the mean subtraction and the bias (Zhang & Sennrich 2019)."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        # the mean of squares is taken in fp32 at least: in bf16 it loses most of its digits
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        if torch.is_grad_enabled():  # training: the same formula with a hand-written, leaner backward
            return _RMSNormFunction.apply(xf, self.weight.to(xf.dtype), self.eps).type_as(x)
        # inference: the formula as written. (F.rms_norm gives the same bits but, on CPU in torch 2.13, runs
        # these very ops and more: a decoding step took 1.05x to 1.10x as long with it.)
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with its backward written out. Autograd would record five element-wise ops and keep
    their inputs; this keeps x_hat = x / rms(x) and 1 / rms(x) only, and runs about 1.3x faster on CPU.
    With n = x.shape[-1] and g the gradient of the output:
        dL/dweight = sum over rows of g * x_hat
        dL/dx      = (g*w - x_hat * mean(g*w * x_hat)) / rms(x)   (the rms depends on every x_i)
    tests/test_model.py checks both against autograd on the plain formula."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        inv_rms = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        x_hat = x * inv_rms
        ctx.save_for_backward(x_hat, inv_rms, weight)
        return x_hat * weight

    @staticmethod
    def backward(ctx, grad):
        x_hat, inv_rms, weight = ctx.saved_tensors
        gw = grad * weight
        grad_x = inv_rms * (gw - x_hat * (gw * x_hat).mean(-1, keepdim=True))
        grad_weight = (grad * x_hat).reshape(-1, x_hat.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, None


def rope_tables(head_dim: int, n_positions: int, base: float,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (n_positions, head_dim): channel pair (i, i + head_dim/2) turns at base^(-2i/head_dim)
    radians per position (Su et al. 2021, 'RoFormer'). Angles are computed in float64, then stored as `dtype`."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(n_positions, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: (batch, heads, seq, head_dim) by position; cos/sin: (seq, head_dim) for those positions.
    'Rotate half' pairs channel i with i + head_dim/2, so the dot product q.k depends only on their distance."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of the tokens seen so far, per layer: (batch, heads, max_len, head_dim) each,
    preallocated; `length` positions are filled. GPT.forward advances `length` after all layers wrote."""

    def __init__(self, n_layers, batch_size, n_heads, max_len, head_dim, device=None, dtype=torch.float32,
                 conv_kernel: int = 0):
        shape = (batch_size, n_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        # A ShortConv reads the inputs of the kernel - 1 positions before each new one; two per layer
        # at most (before attention, before the feed-forward).
        conv_shape = (batch_size, max_len, n_heads * head_dim)
        self.conv_inputs = [torch.zeros(conv_shape, device=device, dtype=dtype)
                            for _ in range(2 * n_layers if conv_kernel else 0)]
        self.conv_kernel = conv_kernel
        self.tokens = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)  # for document masks
        self.batch_size, self.max_len, self.length = batch_size, max_len, 0

    @classmethod
    def for_model(cls, model: "GPT", batch_size: int, max_len: int | None = None, device=None, dtype=None):
        c = model.config
        max_len = c.context_length if max_len is None else max_len
        if not 1 <= max_len <= c.context_length:
            raise ValueError(f"KVCache max_len must be in [1, context_length={c.context_length}], got {max_len}")
        p = next(model.parameters())
        return cls(c.n_layers, batch_size, c.n_heads, max_len, c.head_dim, device or p.device, dtype or p.dtype,
                   c.conv_kernel)

    def add_tokens(self, idx: torch.Tensor) -> torch.Tensor:
        """Check that idx (batch, t) fits after the prefix and record it; return all ids (batch, length + t)."""
        b, t = idx.shape
        if b != self.batch_size:
            raise ValueError(f"KVCache was made for batch_size {self.batch_size}, got a batch of {b}")
        if self.length + t > self.max_len:
            raise ValueError(f"KVCache overflow: {self.length} cached + {t} new tokens > max_len {self.max_len}; "
                             "make the cache larger (up to context_length) or start a new one")
        self.tokens[:, self.length:self.length + t] = idx
        return self.tokens[:, :self.length + t]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (batch, heads, t, head_dim) after the cached prefix; return the whole prefix."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def conv_update(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """Store a ShortConv's input x (batch, t, d_model) after the cached prefix; return the inputs of
        the (up to) kernel - 1 positions before it, then x. slot: 2 * layer, + 1 before the feed-forward."""
        end = self.length + x.shape[1]
        self.conv_inputs[slot][:, self.length:end] = x
        return self.conv_inputs[slot][:, max(0, self.length - self.conv_kernel + 1):end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.scale = config.attn_scale / math.sqrt(self.head_dim)  # multiplies q.k (see GPTConfig.attn_scale)
        d = config.d_model
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.output_proj = nn.Linear(d, d, bias=False)
        # QK-norm (Dehghani et al. 2023): with q and k of unit RMS, attention logits start at a usable
        # scale and cannot blow up, so heads learn to look things up far sooner than with raw q, k.
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else nn.Identity()

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, mask=None):
        """x: (batch, seq, d_model); cos/sin: (seq, head_dim) for the positions of x; mask: None (causal)
        or (batch, 1, seq, cached + seq) where a query may see a key: True in a boolean mask, 0 (else -inf)
        in the float mask GPT.forward builds, which SDPA adds to the scores."""
        b, t, d = x.shape
        # (batch, seq, d) -> (batch, heads, seq, head_dim)
        q, k, v = (proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        offset = 0
        if cache is not None:
            offset = cache.length
            k, v = cache.update(layer, k, v)
        if mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        elif offset == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        elif t == 1:
            y = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # one new token sees the whole prefix
        else:
            # A chunk after a prefix: query i (at position offset + i) sees keys 0 .. offset + i.
            # (is_causal=True would align the triangle to the top-left and hide most of the prefix.)
            mask = torch.ones(t, offset + t, dtype=torch.bool, device=x.device).tril(diagonal=offset)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.output_proj(y.transpose(1, 2).reshape(b, t, d))


class ShortConv(nn.Module):
    """y[t] = x[t] + sum_i weight[i] * x[t - (kernel - 1 - i)] for i = 0 .. kernel-1, channel by channel:
    a causal depthwise convolution (weight[-1] meets the current position, weight[0] the oldest; the
    order of F.conv1d's taps) with a residual, applied to the inputs of attention and of the feed-forward.

    Attention finds a position by what is written *at* it. To restate who holds the ball, a head must
    find the receiver of the ball's last pass (`The ball passes from Tom to Ann`): the word `Ann` must
    say "I received the ball", and without help only an earlier attention layer can gather that from
    the words before it. A short convolution mixes the last few words into each position directly, so
    keys and values start out knowing their neighbours. (Short convolutions beside attention: H3, Fu et
    al. 2023; Based, Arora et al. 2024; "Canon layers", Allen-Zhu 2025.) The weights start at zero,
    so a new model starts as a plain transformer."""

    def __init__(self, d_model: int, kernel: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(kernel, d_model))

    def forward(self, x, keep=None, past=None):
        """x: (batch, seq, d_model); past: None, or (batch, p + seq, d_model) from a KV cache: the inputs at
        the p < kernel positions before x, then x; keep: None, or (batch, seq, kernel), in the weights'
        order: 1.0 where that input is in x[t]'s story, 0.0 where it is in an earlier one (packed stories
        must not see each other), from GPT.conv_keep."""
        t, kernel = x.shape[1], self.weight.shape[0]
        past = x if past is None else past
        if t == 1 and past.shape[1] == kernel:  # decoding one token: one weighted sum over the window
            w = self.weight if keep is None else self.weight * keep[:, 0, :, None]  # (kernel, d) or (b, kernel, d)
            return x + (past * w).sum(dim=1, keepdim=True)
        past = F.pad(past, (0, 0, kernel - 1 - (past.shape[1] - t), 0))  # zeros before the first position
        y = x
        for i in range(kernel):  # past[:, i:i + t] is x shifted kernel - 1 - i positions later
            term = past[:, i:i + t] * self.weight[i]
            y = y + (term if keep is None or i == kernel - 1 else term * keep[..., i:i + 1])
        return y


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
        k = config.conv_kernel
        self.attn_conv = ShortConv(config.d_model, k) if k else None
        self.mlp_conv = ShortConv(config.d_model, k) if k else None

    def forward(self, x, cos, sin, cache=None, layer=0, mask=None, keep=None):
        h = self.attn_norm(x)
        if self.attn_conv is not None:
            h = self.attn_conv(h, keep, cache.conv_update(2 * layer, h) if cache is not None else None)
        x = x + self.attn(h, cos, sin, cache, layer, mask)
        h = self.mlp_norm(x)
        if self.mlp_conv is not None:
            h = self.mlp_conv(h, keep, cache.conv_update(2 * layer + 1, h) if cache is not None else None)
        return x + self.mlp(h)


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
        # 1/sqrt(2 * n_layers) keeps the stream's variance from growing with depth (GPT-2, Radford et al. 2019).
        for name, p in self.named_parameters():
            if name.endswith(("output_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module):
        # N(0, 0.02) for every matrix (GPT-2): small enough that the initial logits are near uniform.
        # There are no biases; RMSNorm gains start at 1 (set in RMSNorm).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """idx: (batch, seq) token ids -> logits (batch, seq, vocab). With a cache, idx continues the
        cached prefix: its positions start at cache.length (not at 0: the usual KV-cache bug)."""
        if idx.dim() != 2:
            raise ValueError(f"GPT expects token ids of shape (batch, seq), got shape {tuple(idx.shape)}")
        start = cache.length if cache is not None else 0
        end = start + idx.shape[1]
        if end > self.config.context_length:
            raise ValueError(f"positions {start}..{end - 1} exceed context_length {self.config.context_length} "
                             f"({start} cached + {idx.shape[1]} new tokens); feed at most context_length tokens")
        ids = cache.add_tokens(idx) if cache is not None else idx
        # Only an end token after the first position splits the rows into documents; without one the
        # document mask equals the causal mask, and the causal path is the faster (e.g. every sampling step).
        # Under torch.compile (training, whose windows always hold several stories) the mask is always
        # built: a branch on the data would split the compiled graph in two.
        eot = self.config.eot_id
        split = eot >= 0 and (torch.compiler.is_compiling() or bool((ids[:, 1:] == eot).any()))
        mask = keep = None
        if split:  # as 0 / -inf added to the scores: SDPA on CPU turns a boolean mask into that every call
            allowed = self.document_mask(ids, start)
            mask = torch.zeros(allowed.shape, dtype=self.tok_emb.weight.dtype, device=ids.device)
            mask.masked_fill_(~allowed, float("-inf"))
            if self.config.conv_kernel:
                keep = self.conv_keep(ids, start)
        cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]
        x = self.tok_emb(idx)
        if x.dtype == torch.float64:  # a float64 check: the buffers hold fp32 values, whose rounding would make
            # a score depend on absolute positions (a packed story vs the same story alone); exact tables do not
            c = self.config
            cos, sin = (t[start:end].to(x.device) for t in rope_tables(c.head_dim, end, c.rope_base, torch.float64))
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i, mask, keep)
        if cache is not None:
            cache.length = end
        return self.lm_head(self.final_norm(x))

    def document_mask(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """ids: (batch, end), the cached prefix and the new tokens at positions start..end-1 ->
        (batch, 1, end - start, end), True where query i may attend to key j: j <= i, same document."""
        doc = (ids == self.config.eot_id).cumsum(dim=1)  # a new document starts at each eot_id
        end = ids.shape[1]
        causal = torch.ones(end - start, end, dtype=torch.bool, device=ids.device).tril(diagonal=start)
        return ((doc[:, start:, None] == doc[:, None, :]) & causal)[:, None]

    def conv_keep(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """ids: (batch, end) as in document_mask -> (batch, end - start, conv_kernel), in ShortConv's weight
        order: 1.0 where the input kernel - 1 - i positions before position start + t is in the same story
        (or before position 0, where ShortConv reads zeros), 0.0 where it is in an earlier one. Dense
        multiplies rather than a sparse fix-up of the few crossing terms: index_put with accumulate is not
        bit-reproducible on a multi-threaded CPU."""
        doc = (ids == self.config.eot_id).cumsum(dim=1)
        pos = torch.arange(start, ids.shape[1], device=ids.device)
        back = torch.arange(self.config.conv_kernel - 1, -1, -1, device=ids.device)  # kernel - 1 - i
        return (doc[:, pos, None] == doc[:, (pos[:, None] - back).clamp(min=0)]).to(self.tok_emb.weight.dtype)

    def param_counts(self) -> dict[str, int]:
        """Parameters by component. named_parameters() yields a tied weight once, as tok_emb.weight,
        so a tied lm_head counts 0. Every RMSNorm gain (q_norm and k_norm included) counts as 'norms'."""
        counts = dict.fromkeys(("embedding", "attention", "conv", "mlp", "norms", "lm_head"), 0)
        for name, p in self.named_parameters():
            kind = ("norms" if "norm" in name else "attention" if ".attn." in name else "mlp" if ".mlp." in name
                    else "conv" if "_conv." in name
                    else "embedding" if name.startswith("tok_emb.") else "lm_head")
            counts[kind] += p.numel()
        if not self.config.conv_kernel:
            del counts["conv"]  # listed only for a model that has ShortConvs
        counts["total"] = sum(counts.values())
        return counts

    def flops_per_token(self) -> float:
        """Training FLOPs per token, forward + backward: 6 * N + 12 * n_layers * d_model * context_length
        (Chowdhery et al. 2022, 'PaLM', appendix B). N counts the weights used in matmuls: the blocks'
        linears and lm_head, which is a matmul even when tied (the embedding lookup is free), and the
        ShortConvs' taps, which also do one multiply-add per token each. The second
        term is attention's scores QK^T and weighted sum AV over the full window, causal mask ignored.
        (Kaplan et al. 2020 count 6 * n_layers * d_model * context_length for the same term.)"""
        c = self.config
        n_matmul = sum(m.weight.numel() for m in self.blocks.modules() if isinstance(m, nn.Linear))
        n_matmul += c.vocab_size * c.d_model
        # A ShortConv weight does one multiply-add per token too (0.5% of the total at the defaults).
        n_matmul += sum(m.weight.numel() for m in self.modules() if isinstance(m, ShortConv))
        return 6 * n_matmul + 12 * c.n_layers * c.d_model * c.context_length


def pick_device(requested: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; a named device that is not there is an error."""
    available = ["cpu"] + ["cuda"] * torch.cuda.is_available() + ["mps"] * torch.backends.mps.is_available()
    if requested == "auto":
        return torch.device("cuda" if "cuda" in available else "mps" if "mps" in available else "cpu")
    if requested.split(":")[0] not in available:
        raise ValueError(f"device {requested!r} is not available on this machine; available: "
                         f"{', '.join(available)} (or 'auto' to pick the best)")
    return torch.device(requested)
