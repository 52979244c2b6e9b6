"""Property tests (hypothesis) over quantizer inputs: grid, clamping, no NaN, finite gradients."""

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from questdeploy.quant.primitives import dequantize, fake_quant, qrange, quantize

F32 = lambda v: float(np.float32(v))  # noqa: E731  (hypothesis wants exactly representable bounds)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

finite = st.floats(allow_nan=False, allow_infinity=False, width=32)
scales = st.floats(min_value=F32(1e-30), max_value=F32(1e30), width=32)


@st.composite
def cases(draw):
    bits = draw(st.sampled_from([4, 8]))
    signed = draw(st.booleans())
    gran = draw(st.sampled_from(["tensor", "axis", "block"]))
    rows = draw(st.integers(1, 4))
    nblocks = draw(st.integers(1, 3))
    block = draw(st.sampled_from([1, 2, 4]))
    cols = nblocks * block
    vals = draw(st.lists(finite, min_size=rows * cols, max_size=rows * cols))
    x = torch.tensor(vals, dtype=torch.float32).reshape(rows, cols)
    if gran == "tensor":
        s = torch.tensor(draw(scales), dtype=torch.float32)
        kw = {}
    elif gran == "axis":
        s = torch.tensor(draw(st.lists(scales, min_size=rows, max_size=rows)), dtype=torch.float32)
        kw = {"axis": 0}
    else:
        s = torch.tensor(draw(st.lists(scales, min_size=rows * nblocks, max_size=rows * nblocks)), dtype=torch.float32)
        s = s.reshape(rows, nblocks)
        kw = {"axis": 1, "block_size": block}
    return x, s, bits, signed, kw


@SETTINGS
@given(cases())
def test_quantize_on_grid_and_clamped(case):
    x, s, bits, signed, kw = case
    qmin, qmax = qrange(bits, signed)
    q = quantize(x, s, bits, signed, **kw)
    assert not torch.isnan(q).any()
    assert torch.equal(q, torch.round(q))
    assert (q >= qmin).all() and (q <= qmax).all()
    y = dequantize(q, s, **kw)
    assert not torch.isnan(y).any()


@SETTINGS
@given(cases())
def test_fake_quant_finite_values_and_gradients(case):
    x, s, bits, signed, kw = case
    x = x.clone().requires_grad_(True)
    s = s.clone().requires_grad_(True)
    y = fake_quant(x, s, bits, signed, **kw)
    assert not torch.isnan(y).any()
    # forward equals dequantize(quantize(.)) bit for bit
    assert torch.equal(y.detach(), dequantize(quantize(x.detach(), s.detach(), bits, signed, **kw), s.detach(), **kw))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.isfinite(s.grad).all()
    # straight-through gradient is either 0 or 1
    assert ((x.grad == 0) | (x.grad == 1)).all()
