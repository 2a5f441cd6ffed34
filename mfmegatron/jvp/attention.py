# TEMPORARY scratch (not committed): replaced by the attention-jvp branch.
import torch
import torch.nn.functional as F


def attention(q, k, v, scale=None):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def attention_jvp(q, k, v, tq, tk, tv, scale=None):
    o = F.scaled_dot_product_attention(q, k, v, scale=scale)
    with torch.no_grad():
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        s = (q @ k.transpose(-1, -2)) * scale
        p = s.softmax(-1)
        ts = (tq @ k.transpose(-1, -2) + q @ tk.transpose(-1, -2)) * scale
        tp = p * (ts - (p * ts).sum(-1, keepdim=True))
        to = tp @ v + p @ tv
    return o, to
