"""``eager_fp32``: eager BERT attention computed in fp32 even under bf16 autocast.

Under ``torch.autocast(bfloat16)`` HF's eager attention rounds the attention scores QKᵀ to bf16 (≈ 3 significant
digits) before the softmax; SDPA's CPU kernel accumulates them in fp32 but is slower at our shapes (demo shape,
2 cores: SDPA 83–104 ms/step, eager 68–75 ms/step). This function keeps eager's speed with SDPA's precision: the
attention itself (a few percent of the FLOPs at d_head = 32, T ≤ 128) runs in fp32, the projections stay bf16.
Registered with transformers' ``AttentionInterface``; the name is not saved in checkpoint configs, so checkpoints
load anywhere with any attention implementation.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

NAME = "eager_fp32"


def eager_fp32_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``transformers.models.bert.modeling_bert.eager_attention_forward`` (B, H, T, d inputs)."""
    scale: float = query.size(-1) ** -0.5 if scaling is None else scaling
    with torch.autocast(device_type=query.device.type, enabled=False):
        scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * scale
        if attention_mask is not None:
            scores = scores + attention_mask.float()
        weights = torch.softmax(scores, dim=-1)
        weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
        out = torch.matmul(weights, value.float()).transpose(1, 2).contiguous()
    return out.to(query.dtype), weights


AttentionInterface.register(NAME, eager_fp32_attention)
