"""Flowformer flow-attention: linear order == explicit N x M form == a loop transcription of the paper."""

from __future__ import annotations

import pytest
import torch

from attnlab.ops import flow_attention
from attnlab.testing import relative_error


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def loops(q, k, v, *, causal, eps=1e-6):
    """Flowformer eqs. 4-9 for one (batch, head), token by token with Python sums (float64)."""
    Q, K = torch.sigmoid(q), torch.sigmoid(k)
    N, M = Q.shape[0], K.shape[0]
    out = torch.zeros(N, v.shape[-1], dtype=torch.float64)
    if not causal:
        I = [1 / float((Q[i] + eps) @ (K.sum(0) + eps)) for i in range(N)]
        O = [1 / float((K[j] + eps) @ (Q.sum(0) + eps)) for j in range(M)]
        sink = [float((Q[i] + eps) @ (sum(K[j] * O[j] for j in range(M)) + eps)) for i in range(N)]
        source = torch.tensor([float((K[j] + eps) @ (sum(Q[i] * I[i] for i in range(N)) + eps))
                               for j in range(M)]).clamp(-1, 1)
        comp = torch.softmax(source, 0) * M
        for i in range(N):
            alloc = torch.sigmoid(torch.tensor(sink[i] * N / M))
            out[i] = alloc * sum(float((Q[i] * I[i]) @ K[j]) * comp[j] * v[j] for j in range(M))
        return out
    nu = [i + 1.0 for i in range(N)]
    I = [nu[i] / float((Q[i] + eps) @ (K[: i + 1].sum(0) + eps)) for i in range(N)]
    O = [nu[j] / float((K[j] + eps) @ (Q[: j + 1].sum(0) + eps)) for j in range(N)]
    sink = [float((Q[i] + eps) @ (sum(K[j] * O[j] for j in range(i + 1)) + eps)) / nu[i] for i in range(N)]
    source = [min(1.0, max(-1.0, float((K[j] + eps) @ (sum(Q[i] * I[i] for i in range(j + 1)) + eps)) / nu[j]))
              for j in range(N)]
    e = torch.exp(torch.tensor(source))
    comp = [nu[j] * e[j] / e[: j + 1].sum() for j in range(N)]
    for i in range(N):
        alloc = torch.sigmoid(torch.tensor(sink[i]))
        out[i] = alloc * sum(float((Q[i] * I[i] / nu[i]) @ K[j]) * comp[j] * v[j] for j in range(i + 1))
    return out


@pytest.mark.parametrize("causal,M", [(False, 9), (False, 14), (True, 9)], ids=["bidir", "bidir-cross", "causal"])
@pytest.mark.parametrize("impl", ["reference", "linear"])
def test_matches_a_token_by_token_transcription(causal: bool, M: int, impl: str) -> None:
    q, k, v = rand(2, 2, 9, 4, seed=1), rand(2, 2, M, 4, seed=2), rand(2, 2, M, 3, seed=3)
    out = flow_attention(q, k, v, causal=causal, impl=impl)
    for b in range(2):
        for h in range(2):
            torch.testing.assert_close(out[b, h], loops(q[b, h], k[b, h], v[b, h], causal=causal))


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("N", [1, 63, 65, 913])
def test_linear_order_equals_the_explicit_matrix_form(causal: bool, N: int) -> None:
    q, k, v = rand(2, 4, N, 16, seed=4), rand(2, 2, N, 16, seed=5), rand(2, 2, N, 8, seed=6)
    ref = flow_attention(q, k, v, causal=causal, impl="reference")
    assert relative_error(flow_attention(q, k, v, causal=causal), ref) < 1e-10
    out32 = flow_attention(q.float(), k.float(), v.float(), causal=causal)
    assert out32.dtype == torch.float32 and relative_error(out32, ref) < 1e-5


def test_causal_rows_do_not_see_the_future_but_bidirectional_rows_do() -> None:
    q, k, v = rand(1, 2, 20, 4, seed=7), rand(1, 2, 20, 4, seed=8), rand(1, 2, 20, 4, seed=9)
    v2 = v.clone()
    v2[:, :, 12:] += 1.0
    causal = flow_attention(q, k, v, causal=True), flow_attention(q, k, v2, causal=True)
    torch.testing.assert_close(causal[0][:, :, :12], causal[1][:, :, :12])
    bidir = flow_attention(q, k, v), flow_attention(q, k, v2)
    assert not torch.allclose(bidir[0][:, :, :12], bidir[1][:, :, :12])


def test_gradients_of_the_linear_order_equal_the_matrix_form() -> None:
    q, k, v = (rand(1, 2, 30, 6, seed=s).requires_grad_() for s in (10, 11, 12))
    for causal in (False, True):
        grads = [torch.autograd.grad(flow_attention(q, k, v, causal=causal, impl=impl).square().sum(), (q, k, v))
                 for impl in ("reference", "linear")]
        for a, b in zip(*grads, strict=True):
            assert relative_error(b, a) < 1e-10


@pytest.mark.parametrize("kwargs,error,words", [
    ({"causal": True}, ValueError, "N=6 queries and M=8 keys"),
    ({"eps": -1e-3}, ValueError, "eps=-0.001"),
    ({"impl": "cuda"}, ValueError, "impl='cuda'"),
])
def test_bad_options_raise_naming_the_argument(kwargs: dict, error: type, words: str) -> None:
    q, k = rand(1, 2, 6, 4), rand(1, 2, 8, 4)
    with pytest.raises(error) as info:
        flow_attention(q, k, k, **kwargs)
    assert words in str(info.value)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
def test_segmented_causal_equals_reference(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, tol: float) -> None:
    """The causal form runs segment by segment with its prefix sums carried; forced with a tiny segment size."""
    import attnlab.ops.lightning as lightning_module

    monkeypatch.setattr(lightning_module, "SEGMENT_BYTES", 1 << 12)
    q, k, v = (rand(2, 4, 150, 8, seed=s, dtype=dtype).requires_grad_() for s in (1, 2, 3))
    assert lightning_module.segment_length(q, v, 64) < 150  # several segments do run
    out = flow_attention(q, k, v, causal=True)
    ref = flow_attention(q, k, v, causal=True, impl="reference")
    grad = rand(*out.shape, seed=4, dtype=dtype)
    got, want = torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)
    assert relative_error(out, ref) < tol
    assert all(relative_error(a, b) < tol for a, b in zip(got, want, strict=True))
    with torch.no_grad():
        assert relative_error(flow_attention(q, k, v, causal=True), ref) < tol
