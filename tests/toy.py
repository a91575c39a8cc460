"""A toy video-language model small enough for fullgraph capture: token embedding, a 'vision' projection merged
with masked_scatter at the video token id, and decoder layers with GQA SDPA self-attention."""

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

VIDEO_ID = 7


class ToyAttention(nn.Module):
    def __init__(self, hidden=64, heads=6, kv_heads=2, form="sdpa"):
        super().__init__()
        self.h, self.kv, self.d, self.form = heads, kv_heads, hidden // heads if hidden % heads == 0 else 8, form
        self.q_proj = nn.Linear(hidden, heads * self.d)
        self.k_proj = nn.Linear(hidden, kv_heads * self.d)
        self.v_proj = nn.Linear(hidden, kv_heads * self.d)
        self.o_proj = nn.Linear(heads * self.d, hidden)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.h, self.d).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv, self.d).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv, self.d).transpose(1, 2)
        if self.form == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # eager, transformers style: repeat_kv, matmul, additive causal mask, softmax, matmul
            rep = self.h // self.kv
            k = k[:, :, None].expand(B, self.kv, rep, T, self.d).reshape(B, self.h, T, self.d)
            v = v[:, :, None].expand(B, self.kv, rep, T, self.d).reshape(B, self.h, T, self.d)
            mask = torch.full((T, T), torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device).triu(1)
            w = torch.matmul(q, k.transpose(2, 3)) * self.d ** -0.5
            w = w + mask[None, None]
            w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
            w = F.dropout(w, p=0.0, training=False)
            o = torch.matmul(w, v)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


class ToyVLM(nn.Module):
    def __init__(self, layers=2, hidden=48, heads=6, kv_heads=2, form="sdpa", vocab=32):
        super().__init__()
        self.config = SimpleNamespace(video_token_id=VIDEO_ID)
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.visual = nn.Linear(12, hidden)
        self.layers = nn.ModuleList(ToyAttention(hidden, heads, kv_heads, form) for _ in range(layers))
        self.lm_head = nn.Linear(hidden, vocab)

    def forward(self, input_ids=None, pixel_values_videos=None, inputs_embeds=None):
        if inputs_embeds is None:
            x = self.embed_tokens(input_ids)
            mask = (input_ids == self.config.video_token_id).unsqueeze(-1).expand_as(x)
            x = x.masked_scatter(mask, self.visual(pixel_values_videos))
        else:
            x = inputs_embeds
        for layer in self.layers:
            x = x + layer(x)
        return self.lm_head(x)


def toy_inputs(B=2, T=96, spans=((8, 80), (20, 96)), seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, 32, (B, T), generator=g)
    for b, (s, e) in enumerate(spans[:B]):
        ids[b, s:e] = VIDEO_ID
    n = int((ids == VIDEO_ID).sum())
    return ids, torch.randn(n, 12, generator=g)
