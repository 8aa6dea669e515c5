"""The straightforward Seemore training loop the benchmark compares against.

Written the way the original from-scratch notebook does it: one ``Head`` module per attention
head (separate key/query/value projections, an explicit causal mask, softmax by hand), the CLS
vector as the only image token, and a Dataset that decodes base64 and resizes the image in every
``__getitem__``. Same sizes as ``SeemoreVLM`` so that samples/s compare like for like.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image


class Head(nn.Module):
    def __init__(self, n_embd, head_size, dropout, is_decoder):
        super().__init__()
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.is_decoder = is_decoder

    def forward(self, x):
        B, T, C = x.shape
        k, q, v = self.key(x), self.query(x), self.value(x)
        wei = q @ k.transpose(-2, -1) * (k.shape[-1] ** -0.5)
        if self.is_decoder:
            tril = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device))
            wei = wei.masked_fill(tril == 0, float("-inf"))
        wei = self.dropout(F.softmax(wei, dim=-1))
        return wei @ v


class MultiHeadAttention(nn.Module):
    def __init__(self, n_embd, num_heads, dropout, is_decoder):
        super().__init__()
        self.heads = nn.ModuleList(Head(n_embd, n_embd // num_heads, dropout, is_decoder) for _ in range(num_heads))
        self.proj = nn.Linear(n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.proj(torch.cat([h(x) for h in self.heads], dim=-1)))


class Block(nn.Module):
    def __init__(self, n_embd, num_heads, dropout, is_decoder):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = MultiHeadAttention(n_embd, num_heads, dropout, is_decoder)
        self.ln2 = nn.LayerNorm(n_embd)
        self.ffn = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class ViT(nn.Module):
    def __init__(self, img_size, patch_size, dim, num_heads, num_blks, dropout):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, (img_size // patch_size) ** 2 + 1, dim))
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, num_heads, dropout, is_decoder=False) for _ in range(num_blks))
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.patch_embedding(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.dropout(x + self.pos_embedding)
        for block in self.blocks:
            x = block(x)
        return self.layer_norm(x[:, 0])


class StraightforwardVLM(nn.Module):
    def __init__(self, img_size, patch_size, image_embed_dim, num_blks, n_embd, n_layer, n_head, vocab_size, block_size, dropout=0.1):
        super().__init__()
        self.vit = ViT(img_size, patch_size, image_embed_dim, n_head, num_blks, dropout)
        self.projector = nn.Sequential(
            nn.Linear(image_embed_dim, 4 * image_embed_dim), nn.GELU(), nn.Linear(4 * image_embed_dim, n_embd), nn.Dropout(dropout)
        )
        self.token_embedding = nn.Embedding(vocab_size, n_embd)
        self.position_embedding = nn.Embedding(block_size + 1, n_embd)
        self.blocks = nn.Sequential(*(Block(n_embd, n_head, dropout, is_decoder=True) for _ in range(n_layer)))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size)

    def forward(self, images, idx, targets):
        img_emb = self.projector(self.vit(images)).unsqueeze(1)
        x = torch.cat([img_emb, self.token_embedding(idx)], dim=1)
        x = x + self.position_embedding(torch.arange(x.shape[1], device=x.device))
        logits = self.lm_head(self.ln_f(self.blocks(x)))
        image_target = torch.full((targets.shape[0], 1), -100, dtype=torch.long, device=targets.device)
        targets = torch.cat([image_target, targets], dim=1)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


class Base64CaptionDataset(torch.utils.data.Dataset):
    """Decodes, converts, resizes and normalises the image on every access, as the notebook does."""

    def __init__(self, b64_images: list[str], input_ids: torch.Tensor, targets: torch.Tensor, img_size: int):
        self.b64_images, self.input_ids, self.targets, self.img_size = b64_images, input_ids, targets, img_size

    def __len__(self):
        return len(self.b64_images)

    def __getitem__(self, i):
        img = Image.open(io.BytesIO(base64.b64decode(self.b64_images[i]))).convert("RGB").resize((self.img_size, self.img_size))
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (pixels - 0.5) / 0.5, self.input_ids[i], self.targets[i]
