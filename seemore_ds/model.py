"""The Seemore vision-language model: ViT encoder -> MLP projector -> causal character decoder.

Pure PyTorch; knows nothing of DeepSpeed. Images enter as uint8 (B, 3, H, W) and are normalised
here, so the data path can stay uint8 end to end.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import update_bn

from seemore_ds.config import ModelConfig
from seemore_ds.tokenizer import IGNORE_INDEX



class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection and PyTorch's SDPA kernel."""

    def __init__(self, dim: int, n_head: int, dropout: float, causal: bool):
        super().__init__()
        self.n_head, self.causal, self.dropout = n_head, causal, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x, context=None, kv_cache: dict | None = None):
        """Queries from ``x`` (B, T, C) alone; keys and values from ``context`` (B, S, C), positions before x that
        are read but not computed, and from x. Causal: each position of x sees all of context, and x up to itself."""
        B, T, C = x.shape
        head_dim = C // self.n_head
        if context is None:
            q, k, v = self.qkv(x).view(B, T, 3, self.n_head, head_dim).permute(2, 0, 3, 1, 4)
        else:  # the same fused weights, split so that no query is computed for a position nobody reads
            weight, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(x, weight[:C], bias[:C]).view(B, T, self.n_head, head_dim).transpose(1, 2)
            k, v = F.linear(torch.cat([context, x], dim=1), weight[C:], bias[C:]).view(
                B, -1, 2, self.n_head, head_dim).permute(2, 0, 3, 1, 4)
        if kv_cache is not None:
            if "k" in kv_cache:
                k = torch.cat([kv_cache["k"], k], dim=2)
                v = torch.cat([kv_cache["v"], v], dim=2)
            kv_cache["k"], kv_cache["v"] = k, v
        S = k.shape[2]
        is_causal, mask = False, None
        if self.causal and T > 1:  # a single new token attends to every earlier position, so it needs no mask
            if S == T:
                is_causal = True
            else:  # the queries are the last T of S positions: SDPA's is_causal would align them with the first
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(dim, 4 * dim)
        self.proj = nn.Linear(4 * dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, dim: int, n_head: int, dropout: float, causal: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, n_head, dropout, causal)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, dropout)
        self.checkpoint = None  # checkpoint(function, *args): activation checkpointing in training (see checkpoint_blocks)

    def forward(self, x, context=None, kv_cache: dict | None = None):
        """``context``: positions before x that the attention reads as keys and values; they are neither
        computed nor returned (see Attention)."""
        if self.checkpoint is not None and self.training and torch.is_grad_enabled() and kv_cache is None:
            return self.checkpoint(self._forward, x) if context is None else self.checkpoint(self._forward, x, context)
        return self._forward(x, context, kv_cache)

    def _forward(self, x, context=None, kv_cache: dict | None = None):
        x = x + self.attn(self.ln1(x), None if context is None else self.ln1(context), kv_cache)
        return x + self.mlp(self.ln2(x))


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm computed in the dtype of its running statistics, which a non-finite batch never enters.

    - DeepSpeed's bf16/fp16 engines cast parameters but not buffers, and ``batch_norm`` refuses a
      bf16 input beside float32 statistics; statistics of low-precision activations are better kept
      in float32 anyway.
    - A step whose loss is NaN/Inf is skipped by the backends; its batch must not leave NaN in the
      running statistics either (checked on the device, without a host sync).
    """

    def forward(self, x):
        dtype = x.dtype
        x = x.to(self.running_mean.dtype)
        weight, bias = self.weight.to(x.dtype), self.bias.to(x.dtype)
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, weight, bias, False, 0.0, self.eps).to(dtype)
        # torch's fused kernel (one pass forward, one backward) updates copies of the statistics, which are
        # kept only if finite.
        mean, var = self.running_mean.clone(), self.running_var.clone()
        momentum = self.momentum
        if momentum is None:  # a cumulative average, as nn.BatchNorm2d keeps (update_bn asks for one)
            momentum = 1.0 / (self.num_batches_tracked.item() + 1)
        out = F.batch_norm(x, mean, var, weight, bias, True, momentum, self.eps)
        with torch.no_grad():
            finite = torch.isfinite(mean).all() & torch.isfinite(var).all()
            self.running_mean.copy_(torch.where(finite, mean, self.running_mean))
            self.running_var.copy_(torch.where(finite, var, self.running_var))
            self.num_batches_tracked.add_(finite.long())
        return out.to(dtype)


def conv_stem_widths(patch_size: int, dim: int, max_width: int = 0) -> list[int]:
    """Channels after each of ConvStem's stride-2 convolutions, one per time 2 divides the patch size:
    doubling towards ``dim`` (or ``max_width``, where that is set and smaller), at least 16."""
    top = min(dim, max_width) if max_width else dim
    halvings = (patch_size & -patch_size).bit_length() - 1
    return [max(top >> (halvings - 1 - i), 16) for i in range(halvings)]


class ConvStem(nn.Module):
    """Patch embedding by a stack of 3x3 stride-2 convolutions (Xiao et al., 2021, "Early convolutions
    help transformers see better"), then one conv for whatever odd factor of the patch size remains.
    With ``full_res_width``, a 3x3 stride-1 convolution at the image's full resolution comes first: the
    first halving no longer decides alone what a few-pixel shape looks like (docs/design.md).

    With ``max_width``, the stride-2 convolutions stop widening there and the last convolution projects
    to ``dim``: a wide ViT's stem then costs what a narrow one's does (docs/design.md).

    Output grid and width equal the single patch_size x patch_size convolution's, so it is a drop-in.
    """

    def __init__(self, patch_size: int, dim: int, full_res_width: int = 0, max_width: int = 0):
        super().__init__()
        widths = conv_stem_widths(patch_size, dim, max_width)
        rest = patch_size >> len(widths)
        layers, channels = [], 3
        if full_res_width:
            layers += [nn.Conv2d(channels, full_res_width, kernel_size=3, stride=1, padding=1, bias=False),
                       BatchNorm2d(full_res_width), nn.ReLU()]
            channels = full_res_width
        for width in widths:
            # BatchNorm: without it this stem learns shapes no faster than the single patch conv (docs/design.md).
            layers += [nn.Conv2d(channels, width, kernel_size=3, stride=2, padding=1, bias=False),
                       BatchNorm2d(width), nn.ReLU()]
            channels = width
        layers.append(nn.Conv2d(channels, dim, kernel_size=rest, stride=rest) if rest > 1 else nn.Conv2d(channels, dim, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, images):
        # Channels-last: oneDNN's convolutions and their BatchNorms run a few percent faster on it (a CPU step of
        # the default model, docs/design.md).
        return self.layers(images.contiguous(memory_format=torch.channels_last))


class ViT(nn.Module):
    """Convolutional patch embedding (optionally LayerNormed), CLS token, learned positions, pre-LN blocks."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.image_embed_dim
        self.num_patches = (cfg.img_size // cfg.patch_size) ** 2
        if cfg.patch_embed == "conv_stem":
            self.patch_embed = ConvStem(cfg.patch_size, dim, cfg.stem_full_res_width, cfg.stem_max_width)
        else:  # seemore's single patch_size x patch_size convolution
            self.patch_embed = nn.Conv2d(3, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.patch_norm = nn.LayerNorm(dim) if cfg.patch_norm else nn.Identity()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, dim))
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(dim, cfg.n_head, cfg.dropout, causal=False) for _ in range(cfg.num_blks))
        self.ln = nn.LayerNorm(dim)

    def forward(self, images, keep: int | None = None):
        """(B, 1 + patches, dim), index 0 the CLS token; only the first ``keep`` tokens when given,
        which the last block then computes alone (same result, fewer FLOPs)."""
        x = self.patch_norm(self.patch_embed(images).flatten(2).transpose(1, 2))  # (B, patches, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.dropout(x)
        for block in self.blocks[:-1]:
            x = block(x)
        last = self.blocks[-1]
        return self.ln(last(x) if keep is None else last(x[:, :keep], x[:, keep:]))


class Projector(nn.Module):
    """image_embed_dim -> 4 * image_embed_dim -> n_embd, as in seemore."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.image_embed_dim, 4 * cfg.image_embed_dim)
        self.proj = nn.Linear(4 * cfg.image_embed_dim, cfg.n_embd)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Decoder(nn.Module):
    """Causal character-level transformer; the image tokens come first, prepended to the text embeddings or read
    by every block as keys and values only (``memory``)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, max_positions: int):
        super().__init__()
        self.tok_embed = nn.Embedding(vocab_size, cfg.n_embd)
        self.pos_embed = nn.Embedding(max_positions, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg.n_embd, cfg.n_head, cfg.dropout, causal=True) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size)

    def forward(self, x, start_pos: int = 0, kv_caches: list | None = None, memory=None):
        """x: (B, T, n_embd) input embeddings at positions start_pos..start_pos+T-1; returns their hidden states.
        ``memory``: (B, M, n_embd) embeddings at positions 0..M-1 (M <= start_pos) that every block reads as
        keys and values but does not update; a block's KV cache keeps them after the first call."""
        positions = torch.arange(start_pos, start_pos + x.shape[1], device=x.device)
        x = self.dropout(x + self.pos_embed(positions))
        if memory is not None:
            memory = self.dropout(memory + self.pos_embed(torch.arange(memory.shape[1], device=x.device)))
        for i, block in enumerate(self.blocks):
            x = block(x, memory, kv_caches[i] if kv_caches is not None else None)
        return self.ln_f(x)


class SeemoreVLM(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.vit = ViT(cfg)
        self.projector = Projector(cfg)
        self.num_image_tokens = {"patches": self.vit.num_patches + 1, "cls": 1,
                                 "pooled": self.vit.num_patches // cfg.token_pool**2 + 1}[cfg.image_tokens]
        self.text_len = cfg.max_caption_len + 1  # <bos> + caption, or caption + <eos>
        self.decoder = Decoder(cfg, vocab_size, self.num_image_tokens + self.text_len)
        self.apply(self._init_weights)
        # Learned positions start from the 2-D sine-cosine table: at N(0, 0.02) they are drowned by the
        # patch embeddings and the model confuses left with right for hundreds of steps (docs/design.md).
        with torch.no_grad():
            self.vit.pos_embed.copy_(sincos_2d(cfg.img_size // cfg.patch_size, cfg.image_embed_dim))
        nn.init.trunc_normal_(self.vit.cls_token, std=0.02)
        # GPT-2: scale residual projections by depth so the residual stream starts near unit variance.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") and "projector" not in name:
                depth = self.cfg.n_layer if name.startswith("decoder") else self.cfg.num_blks
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * depth))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def checkpoint_blocks(self, checkpoint) -> int:
        """Run every ViT and decoder block in training through ``checkpoint(function, *args)`` (e.g.
        ``torch.utils.checkpoint`` or DeepSpeed's): each block keeps only its input for the backward.
        Returns the number of blocks."""
        blocks = [module for module in self.modules() if isinstance(module, Block)]
        for block in blocks:
            block.checkpoint = checkpoint
        return len(blocks)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> the ViT's input: in [-1, 1], on the model's device and in its dtype."""
        return images.to(self.vit.cls_token.device, self.vit.cls_token.dtype) / 127.5 - 1.0

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> image tokens in the decoder's space (B, num_image_tokens, n_embd)."""
        tokens = self.vit(self.pixels(images), keep=1 if self.cfg.image_tokens == "cls" else None)
        if self.cfg.image_tokens == "pooled":
            tokens = pool_patch_tokens(tokens, self.cfg.token_pool)
        return self.projector(tokens)

    def decode(self, image_tokens: torch.Tensor, text: torch.Tensor, kv_caches: list | None = None) -> torch.Tensor:
        """The decoder's hidden states at the text positions, given the image tokens and the text embeddings
        (B, T, n_embd) that follow them. With ``decoder_updates_images`` every block computes the image
        positions too, though they predict nothing; without, the blocks read them as keys and values only."""
        if self.cfg.decoder_updates_images:
            hidden = self.decoder(torch.cat([image_tokens, text], dim=1), kv_caches=kv_caches)
            return hidden[:, self.num_image_tokens:]
        return self.decoder(text, start_pos=self.num_image_tokens, kv_caches=kv_caches, memory=image_tokens)

    @torch.no_grad()
    def settle_running_stats(self, images: torch.Tensor, batch_size: int) -> None:
        """The stem's BatchNorm running statistics recomputed for the current weights: their average over
        ``images`` (uint8, in batches of ``batch_size``), which evaluation and inference then use.

        The running averages that training keeps trail its weights: measured on a held-out split, a
        checkpoint evaluated with them scored 0.04 exact match where the same weights score 0.97 with
        statistics recomputed (docs/time_to_quality.md). Only the stem runs; no random numbers are drawn."""
        batches = (self.pixels(images[i:i + batch_size]) for i in range(0, len(images), batch_size))
        update_bn(batches, self.vit.patch_embed)

    def forward(self, images, input_ids, targets=None):
        """Returns (logits over the text positions, mean loss over non-ignored targets or None)."""
        hidden = self.decode(self.encode_images(images), self.decoder.tok_embed(input_ids))
        logits = self.decoder.lm_head(hidden)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss

    @torch.no_grad()
    def generate(self, images, bos_id: int, eos_id: int, max_new_tokens: int | None = None,
                 temperature: float = 0.0, top_k: int | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> list[list[int]]:
        """Caption a batch of uint8 images; greedy when temperature is 0. Stops at <eos>."""
        max_new_tokens = min(max_new_tokens or self.text_len, self.text_len)
        B = images.shape[0]
        ids = torch.full((B, 1), bos_id, dtype=torch.long, device=images.device)
        image_tokens = self.encode_images(images)
        caches = [{} for _ in self.decoder.blocks] if use_cache else None
        done = torch.zeros(B, dtype=torch.bool, device=images.device)
        for _ in range(max_new_tokens):
            # After the first call the caches hold the image and the text so far: only the newest token is computed.
            if use_cache and ids.shape[1] > 1:
                start = self.num_image_tokens + ids.shape[1] - 1
                hidden = self.decoder(self.decoder.tok_embed(ids[:, -1:]), start_pos=start, kv_caches=caches)
            else:
                hidden = self.decode(image_tokens, self.decoder.tok_embed(ids), caches)
            logits = self.decoder.lm_head(hidden[:, -1]).float()
            next_id = sample_next(logits, temperature, top_k, generator)
            next_id = torch.where(done, torch.full_like(next_id, eos_id), next_id)
            ids = torch.cat([ids, next_id[:, None]], dim=1)
            done |= next_id == eos_id
            if done.all():
                break
        captions = []
        for row in ids[:, 1:].tolist():
            captions.append(row[: row.index(eos_id)] if eos_id in row else row)
        return captions

    def flops_per_sample(self, text_len: int | None = None) -> int:
        """Training FLOPs for one sample (forward + backward = 3 x forward): convolutions, matmuls, attention.
        ``text_len``: the text positions trained (the data's longest caption + 1); default: all the model has."""
        c = self.cfg
        text_len = text_len or self.text_len
        vit_tokens = self.vit.num_patches + 1
        vit_read = 1 if c.image_tokens == "cls" else vit_tokens  # what the last ViT block computes
        dec_tokens = self.num_image_tokens + text_len

        def block(dim, tokens, out):  # k, v for all tokens; q, proj, mlp (2 x 4 dim^2) for ``out``; QK^T, AV
            return 2 * (2 * tokens + 10 * out) * dim * dim + 2 * 2 * out * tokens * dim

        forward = (
            conv_flops(self.vit.patch_embed, c.img_size)
            + (c.num_blks - 1) * block(c.image_embed_dim, vit_tokens, vit_tokens)
            + block(c.image_embed_dim, vit_tokens, vit_read)
            + 2 * self.num_image_tokens * (4 * c.image_embed_dim**2 + 4 * c.image_embed_dim * c.n_embd)
            + c.n_layer * block(c.n_embd, dec_tokens, dec_tokens if c.decoder_updates_images else text_len)
            + 2 * text_len * c.n_embd * self.vocab_size
        )
        return 3 * forward


def pool_patch_tokens(tokens: torch.Tensor, pool: int) -> torch.Tensor:
    """(B, 1 + g*g, D) CLS + patch tokens -> (B, 1 + (g/pool)^2, D): each pool x pool square of patches
    averaged into one token, in the same row-major order; the CLS token kept as it is."""
    B, n, D = tokens.shape
    grid = math.isqrt(n - 1)
    patches = tokens[:, 1:].transpose(1, 2).reshape(B, D, grid, grid)
    pooled = F.avg_pool2d(patches, pool).flatten(2).transpose(1, 2)
    return torch.cat([tokens[:, :1], pooled], dim=1)


def conv_flops(module: nn.Module, img_size: int) -> int:
    """Forward FLOPs of the convolutions in ``module``, applied in order to a square ``img_size`` image."""
    flops, side = 0, img_size
    for conv in (m for m in module.modules() if isinstance(m, nn.Conv2d)):
        side = (side + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        flops += 2 * side * side * conv.out_channels * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    return flops


def sample_next(logits, temperature: float, top_k: int | None, generator=None):
    """Pick the next token from (B, vocab) logits: argmax at temperature 0, else top-k sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(1, 1 + grid*grid, dim) 2-D sine-cosine positions as in MAE; row 0, the CLS slot, is zero.

    A quarter of the channels each holds sin(x), cos(x), sin(y), cos(y) at geometric frequencies;
    channels left over when dim is not a multiple of 4 stay zero.
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    out_y, out_x = ys.flatten()[:, None] * omega, xs.flatten()[:, None] * omega
    table = torch.cat([out_x.sin(), out_x.cos(), out_y.sin(), out_y.cos()], dim=1)
    table = torch.cat([torch.zeros(1, 4 * quarter, dtype=torch.float64), table], dim=0)
    return F.pad(table, (0, dim - 4 * quarter))[None].float()
