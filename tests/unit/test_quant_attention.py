"""QuantAttnProcessor reproduces diffusers' attention and quantizes the four matmul operands."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from questdeploy.quant.attention import QuantAttnProcessor
from questdeploy.quant.quantizers import export_hook


def _cases():
    torch.manual_seed(0)
    yield "self_3d", Attention(16, heads=2, dim_head=8), dict(hidden_states=torch.randn(2, 5, 16))
    yield "cross_3d", Attention(16, cross_attention_dim=12, heads=2, dim_head=8), dict(
        hidden_states=torch.randn(2, 5, 16), encoder_hidden_states=torch.randn(2, 3, 12)
    )
    yield "cross_mask", Attention(16, cross_attention_dim=12, heads=2, dim_head=8), dict(
        hidden_states=torch.randn(2, 5, 16),
        encoder_hidden_states=torch.randn(2, 3, 12),
        attention_mask=torch.tensor([[0.0, 0.0, -1e4], [0.0, -1e4, 0.0]]).unsqueeze(1),
    )
    # UNet2DModel's AttnDownBlock / mid-block attention: 4-D input, group norm, residual, rescale
    yield "unet2d_4d", Attention(
        32, heads=4, dim_head=8, norm_num_groups=8, residual_connection=True, bias=True, upcast_softmax=True,
        rescale_output_factor=2.0, eps=1e-6, _from_deprecated_attn_block=True,
    ), dict(hidden_states=torch.randn(2, 32, 4, 4))
    yield "spatial_norm", Attention(32, heads=2, dim_head=8, spatial_norm_dim=4, residual_connection=True), dict(
        hidden_states=torch.randn(2, 32, 3, 3), temb=torch.randn(2, 4, 3, 3)
    )


CASES = list(_cases())
IDS = [c[0] for c in CASES]


def _run(attn, proc, kw):
    attn.set_processor(proc)
    with torch.no_grad():
        return attn(**kw)


@pytest.mark.parametrize("name,attn,kw", CASES, ids=IDS)
def test_disabled_is_exactly_the_original_processor(name, attn, kw):
    ref = _run(attn, AttnProcessor2_0(), kw)
    proc = QuantAttnProcessor(fallback=AttnProcessor2_0())
    for q in proc.quantizers().values():
        q.enabled = False
    assert torch.equal(_run(attn, proc, kw), ref)


@pytest.mark.parametrize("name,attn,kw", CASES, ids=IDS)
def test_explicit_path_matches_diffusers(name, attn, kw):
    ref_sdpa = _run(attn, AttnProcessor2_0(), kw)
    ref_classic = _run(attn, AttnProcessor(), kw)
    proc = QuantAttnProcessor()  # no fallback -> always the explicit matmul path
    for q in proc.quantizers().values():
        q.enabled = False
    out = _run(attn, proc, kw)
    torch.testing.assert_close(out, ref_classic, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref_sdpa, rtol=1e-5, atol=1e-5)


def test_quantized_operands_and_gradients():
    torch.manual_seed(0)
    attn = Attention(16, cross_attention_dim=12, heads=2, dim_head=8)
    x, e = torch.randn(2, 5, 16), torch.randn(2, 3, 12)
    ref = _run(attn, AttnProcessor2_0(), dict(hidden_states=x, encoder_hidden_states=e))
    proc = QuantAttnProcessor(fallback=AttnProcessor2_0())
    seen = []

    def hook(q, t):
        seen.append((q, tuple(t.shape), float(t.detach().abs().max())))
        return t

    attn.set_processor(proc)
    with export_hook(hook):  # the hook forces the explicit path even with a fallback
        attn(x, e)
    assert [s[0] for s in seen] == [proc.q_quantizer, proc.k_quantizer, proc.probs_quantizer, proc.v_quantizer]
    assert [s[1] for s in seen] == [(2, 2, 5, 8), (2, 2, 3, 8), (2, 2, 5, 3), (2, 2, 3, 8)]
    for q, (_, _, amax) in zip(proc.quantizers().values(), seen):
        q.scales.data.fill_(amax / q.qmax)
    out = attn(x, e)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.05
    out.square().sum().backward()
    for q in proc.quantizers().values():
        assert q.scales.grad is not None and torch.isfinite(q.scales.grad).all()


def test_probs_quantizer_is_unsigned_8bit():
    proc = QuantAttnProcessor(bits=4)
    assert proc.probs_quantizer.signed is False and proc.probs_quantizer.bits == 8
    assert proc.q_quantizer.bits == 4 and proc.q_quantizer.signed
