"""Attention processor with explicit, quantizable matmuls for diffusers ``Attention``.

Why: ``scaled_dot_product_attention`` hides the operands of ``Q·Kᵀ`` and ``softmax·V``; QuEST quantizes
all four (both ``Q·Kᵀ`` operands, the softmax output with an unsigned grid, and ``V``). Following the
official code, ``q`` and ``k`` are each multiplied by ``sqrt(attn.scale)`` *before* quantization so the
scores are ``(q·kᵀ)·attn.scale`` and both operands see a balanced range.

``to_q/to_k/to_v/to_out.0`` are Linear layers and are quantized independently (``QuantLinear``) by
``wrap.py``. When every quantizer of this processor is disabled and no export hook is active, the
processor delegates to the processor it replaced (``fallback``), so the model runs *exactly* as before
(diffusers' default is SDPA, whose rounding the explicit path cannot reproduce bit for bit).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .quantizers import ActQuantizer, active_export_hook

__all__ = ["QuantAttnProcessor"]


class QuantAttnProcessor(nn.Module):
    """Drop-in processor for diffusers ``Attention`` (self- and cross-attention, 3-D or 4-D input).

    Children: ``q_quantizer``, ``k_quantizer``, ``v_quantizer`` (signed, ``bits``) and
    ``probs_quantizer`` (unsigned unless ``probs_signed``, ``probs_bits``), each an ``ActQuantizer`` with ``num_groups`` rows.
    """

    def __init__(self, num_groups: int = 1, bits: int = 8, probs_bits: int = 8, fallback=None, name: str = "",
                 probs_signed: bool = False):
        super().__init__()
        self.q_quantizer = ActQuantizer(num_groups, bits, signed=True)
        self.k_quantizer = ActQuantizer(num_groups, bits, signed=True)
        # unsigned uses all 8 bits for [0, 1]; TensorRT takes only signed int8 with zero point 0, so the
        # trt target quantizes probabilities on the signed grid (7 bits of resolution, exactly exportable)
        self.probs_quantizer = ActQuantizer(num_groups, probs_bits, signed=probs_signed, allowed_bits=(8, 16))
        self.v_quantizer = ActQuantizer(num_groups, bits, signed=True)
        # kept out of the module tree: the replaced processor is plain code, not state
        self._fallback = (fallback,)
        self.name = name
        self.force_explicit = False

    @property
    def fallback(self):
        return self._fallback[0]

    def quantizers(self) -> dict[str, ActQuantizer]:
        return {
            "q_quantizer": self.q_quantizer,
            "k_quantizer": self.k_quantizer,
            "probs_quantizer": self.probs_quantizer,
            "v_quantizer": self.v_quantizer,
        }

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        # explicit signature: diffusers' Attention.forward drops kwargs (e.g. ``temb``) that the
        # processor's ``__call__`` does not name, and nn.Module's generic ``__call__`` names none
        return super().__call__(
            attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
        )

    def _use_fallback(self) -> bool:
        if self.force_explicit or self.fallback is None or active_export_hook() is not None:
            return False
        return not any(q.enabled or q.observing for q in self.quantizers().values())

    def forward(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if self._use_fallback():
            return self.fallback(
                attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, temb=temb
            )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)

        dtype = query.dtype
        if attn.upcast_attention:
            query, key = query.float(), key.float()
        root = math.sqrt(attn.scale)
        query = self.q_quantizer(query * root)
        key = self.k_quantizer(key * root)
        scores = torch.matmul(query, key.transpose(-1, -2))
        if attention_mask is not None:
            scores = scores + attention_mask
        if attn.upcast_softmax:
            scores = scores.float()
        probs = scores.softmax(dim=-1).to(dtype)
        probs = self.probs_quantizer(probs)
        value = self.v_quantizer(value)
        hidden_states = torch.matmul(probs, value)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states

    def extra_repr(self) -> str:
        return f"name={self.name!r}, fallback={type(self.fallback).__name__}"
