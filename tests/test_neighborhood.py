"""Neighborhood attention: NATTEN's mask rule (the spec's pictures), its identities, fast paths == reference."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from attnlab.ops import neighborhood_attention, neighborhood_mask, softmax_attention
from attnlab.ops.neighborhood import _gather_blocks, _Grid, neighborhood_attention_reference

# The mask pictures of specs/mechanisms.md section 9 (generated there from a port of NATTEN's flex rule).
PICTURES = {
    "n=8,K=3": (dict(shape=8, kernel_size=3), """
        xxx..... xxx..... .xxx.... ..xxx... ...xxx.. ....xxx. .....xxx .....xxx"""),
    "n=8,K=4": (dict(shape=8, kernel_size=4), """
        xxxx.... xxxx.... xxxx.... .xxxx... ..xxxx.. ...xxxx. ....xxxx ....xxxx"""),
    "K=4,s=4": (dict(shape=8, kernel_size=4, stride=4), """
        xxxx.... xxxx.... xxxx.... xxxx.... ....xxxx ....xxxx ....xxxx ....xxxx"""),
    "K=4,s=2": (dict(shape=8, kernel_size=4, stride=2), """
        xxxx.... xxxx.... .xxxx... .xxxx... ...xxxx. ...xxxx. ....xxxx ....xxxx"""),
    "n=9,K=3,d=2": (dict(shape=9, kernel_size=3, dilation=2), """
        x.x.x.... .x.x.x... x.x.x.... .x.x.x... ..x.x.x.. ...x.x.x. ....x.x.x ...x.x.x. ....x.x.x"""),
    "K=3 causal": (dict(shape=8, kernel_size=3, causal=True), """
        x....... xx...... xxx..... .xxx.... ..xxx... ...xxx.. ....xxx. .....xxx"""),
    "K=4,s=2 causal": (dict(shape=8, kernel_size=4, stride=2, causal=True), """
        x....... xx...... xxx..... xxxx.... ..xxx... ..xxxx.. ....xxx. ....xxxx"""),
}


def picture(text: str) -> torch.Tensor:
    return torch.tensor([[c == "x" for c in row] for row in text.split()])


@pytest.mark.parametrize("name", list(PICTURES))
def test_mask_pictures_of_the_spec(name: str) -> None:
    options, text = PICTURES[name]
    shape = options.pop("shape")
    mask = neighborhood_mask(shape, **options)
    options["shape"] = shape
    assert torch.equal(mask, picture(text)), f"{name}:\n{mask.int()}"


def rule_1d(q: int, k: int, n: int, K: int, s: int, d: int, causal: bool) -> bool:
    """NATTEN's 1-D rule written out from the spec text, one pair at a time."""
    if q % d != k % d:
        return False
    g = q % d
    qp, kp, ng = q // d, k // d, math.ceil((n - g) / d)
    if causal:
        lead = min((qp // s) * s + s - 1, ng - 1)
        return kp <= qp and lead - kp < K
    left, right = K // 2, K // 2 + K % 2 - 1
    lead = min((qp // s) * s + s // 2, ng - 1)
    centre = min(max(lead, left), ng - 1 - right)
    return centre - left <= kp <= centre + right


def one_dim_cases() -> list:
    cases = []
    for n in (5, 8, 11):
        for K in range(2, n + 1):
            for d in range(1, n // K + 1):
                for s in sorted({1, 2, K}):
                    if s <= K:
                        for causal in (False, True):
                            cases.append((n, K, s, d, causal))
    return cases


def test_one_dim_rule_matches_the_spec_text_everywhere() -> None:
    cases = one_dim_cases()
    assert len(cases) > 100
    for n, K, s, d, causal in cases:
        mask = neighborhood_mask(n, K, stride=s, dilation=d, causal=causal)
        expected = torch.tensor([[rule_1d(q, k, n, K, s, d, causal) for k in range(n)] for q in range(n)])
        assert torch.equal(mask, expected), (n, K, s, d, causal)
        if not causal:  # windows are shifted inward: every query sees exactly K keys
            assert (mask.sum(1) == K).all(), (n, K, s, d)


def test_full_causal_and_blocked_special_cases() -> None:
    n = 12
    assert neighborhood_mask(n, n).all()  # kernel_size == N, non-causal: full attention
    assert torch.equal(neighborhood_mask(n, n, causal=True), torch.ones(n, n, dtype=torch.bool).tril())
    i = torch.arange(n)
    for K in (2, 3, 4, 6):
        blocked = (i[:, None] // K) == (i[None, :] // K)
        assert torch.equal(neighborhood_mask(n, K, stride=K), blocked), K


@pytest.mark.parametrize("shape,kernel,stride,dilation,causal", [
    ((5, 6), (3, 2), (1, 2), (1, 2), (False, False)),
    ((6, 4), 3, (3, 1), (2, 1), (True, False)),
    ((3, 4, 5), (2, 3, 2), (2, 1, 1), (1, 1, 2), (True, False, True)),
    ((4, 3, 6), (3, 3, 4), 1, 1, False),
])
def test_multi_dim_mask_is_the_and_of_the_axis_rules(shape, kernel, stride, dilation, causal) -> None:
    dims = len(shape)
    per_axis = [x if isinstance(x, tuple) else (x,) * dims for x in (kernel, stride, dilation, causal)]
    mask = neighborhood_mask(shape, kernel, stride=stride, dilation=dilation, causal=causal)
    coords = list(itertools.product(*[range(n) for n in shape]))  # row-major order
    assert mask.shape == (len(coords), len(coords))
    expected = torch.tensor([[all(rule_1d(a[x], b[x], shape[x], per_axis[0][x], per_axis[1][x], per_axis[2][x],
                                          per_axis[3][x]) for x in range(dims)) for b in coords] for a in coords])
    assert torch.equal(mask, expected)


def test_freeswim_inward_window_is_a_3d_neighborhood() -> None:
    """FreeSwim (arXiv 2511.14712) rule, written from specs/analysis.md B10, == the NATTEN mask."""
    F, Hh, W, dh, dw = 2, 6, 7, 1, 2
    coords = list(itertools.product(range(F), range(Hh), range(W)))

    def sees(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
        _, h, w = a
        _, h2, w2 = b
        db, du = max(0, dh - h), max(0, dh + h - Hh + 1)
        dr, dl = max(0, dw - w), max(0, dw + w - W + 1)
        return h - dh - du <= h2 <= h + dh + db and w - dw - dl <= w2 <= w + dw + dr

    expected = torch.tensor([[sees(a, b) for b in coords] for a in coords])
    mask = neighborhood_mask((F, Hh, W), (F, 2 * dh + 1, 2 * dw + 1))
    assert torch.equal(mask, expected)
    assert (mask.sum(1) == (2 * dh + 1) * (2 * dw + 1) * F).all()


@pytest.mark.parametrize("kwargs,words", [
    (dict(shape=7, kernel_size=9), ["kernel_size=9", "7"]),
    (dict(shape=7, kernel_size=3, dilation=3), ["3 * 3 = 9", "7"]),
    (dict(shape=8, kernel_size=3, stride=4), ["stride=4", "kernel_size=3"]),
    (dict(shape=8, kernel_size=1), ["kernel_size=1", ">= 2"]),
    (dict(shape=(4, 5), kernel_size=(3, 6)), ["kernel_size=6", "5"]),
    (dict(shape=(4, 5), kernel_size=(3, 2, 2)), ["kernel_size", "3 entries"]),
])
def test_invalid_combinations_raise_with_the_numbers(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        neighborhood_mask(kwargs.pop("shape"), **kwargs)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_shape_must_match_the_sequence() -> None:
    q = torch.randn(1, 2, 12, 4)
    with pytest.raises(ValueError, match="N=12"):
        neighborhood_attention(q, q, q, kernel_size=3, shape=(3, 5))


CASES = [
    pytest.param(dict(shape=(29,), kernel_size=5), id="1d-K5"),
    pytest.param(dict(shape=(29,), kernel_size=6, stride=3, dilation=2, causal=True), id="1d-K6-s3-d2-causal"),
    pytest.param(dict(shape=(300,), kernel_size=37), id="1d-N300-K37"),
    pytest.param(dict(shape=(6, 7), kernel_size=(3, 4), stride=(1, 2), dilation=(2, 1)), id="2d"),
    pytest.param(dict(shape=(6, 7), kernel_size=3, causal=(True, False)), id="2d-causal-rows"),
    pytest.param(dict(shape=(3, 4, 5), kernel_size=(2, 3, 3), causal=(True, False, False)), id="3d"),
]


@pytest.mark.parametrize("options", CASES)
def test_gather_equals_reference_forward_and_backward(options: dict) -> None:
    g = torch.Generator().manual_seed(0)
    N = math.prod(options["shape"])
    q = torch.randn(2, 4, N, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, N, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, N, 5, generator=g, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 4, N, 5, generator=g, dtype=torch.float64)
    results = []
    for impl in ("reference", "gather"):
        out = neighborhood_attention(q, k, v, impl=impl, **options)
        grads = torch.autograd.grad((out * grad).sum(), (q, k, v))
        results.append((out, *grads))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


# impl="flex" (compiled FlexAttention) against the reference: tests/test_flex_local.py (1-D, 2-D, 3-D grids)


def test_flex_refuses_backward_on_cpu_and_auto_picks_gather() -> None:
    q = torch.randn(1, 2, 16, 8, requires_grad=True)
    with pytest.raises(NotImplementedError, match="no backward on CPU"):
        neighborhood_attention(q, q, q, kernel_size=3, impl="flex")
    neighborhood_attention(q, q, q, kernel_size=3).square().sum().backward()  # auto: gather, differentiable
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_gather_memory_is_linear_in_n() -> None:
    """The gathered key lists stay O(N * K): at N=4096, K=31 far below the N^2 of a dense mask."""
    N, K = 4096, 31
    key_index, allowed = _gather_blocks(_Grid((N,), K, 1, 1, False), torch.device("cpu"))
    G, Bq, S = allowed.shape
    assert G * Bq >= N and S <= Bq + K - 1
    assert key_index.numel() + allowed.numel() < N * (Bq + K) * 2 < N * N // 10


def test_bfloat16_gather_accumulates_in_float32() -> None:
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(3, 1, 2, 256, 32, generator=g)
    out = neighborhood_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), kernel_size=15, causal=True)
    expected = neighborhood_attention(q.double(), k.double(), v.double(), kernel_size=15, causal=True,
                                      impl="reference")
    assert out.dtype == torch.bfloat16
    error = ((out.double() - expected).norm() / expected.norm()).item()
    assert error < 1e-2
    dense = softmax_attention(q, k, v, causal=True)
    assert ((dense.double() - expected).norm() / expected.norm()).item() > 0.05  # the window matters here


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "centred"])
def test_gather_lists_built_in_parts_give_the_mask(causal: bool) -> None:
    """At N=2048, kernel 127 the lists are built in several parts of blocks (their widths differ and are
    padded): the keys each query may see are exactly the rows of :func:`neighborhood_mask`."""
    N, K = 2048, 127
    key_index, allowed = _gather_blocks(_Grid((N,), K, 1, 1, causal), torch.device("cpu"))
    G, Bq, S = allowed.shape
    dense = torch.zeros(G * Bq, N + 1, dtype=torch.long)
    rows = torch.arange(G * Bq)[:, None].expand(-1, S)
    cols = torch.where(allowed.reshape(G * Bq, S), key_index.repeat_interleave(Bq, dim=0), N)
    dense.index_put_((rows, cols), torch.ones_like(cols), accumulate=True)
    assert int(dense[:, :N].max()) == 1  # no key twice in a row
    assert torch.equal(dense[:N, :N].bool(), neighborhood_mask((N,), K, causal=causal))


def test_kernel_size_follows_natten_argument_rule() -> None:
    """NATTEN's check accepts any integer kernel >= 2 (even ones too, since GNA): an even K sees K//2 keys
    before the centre and K//2 - 1 after; 1, a float, a bool or a kernel longer than the axis are refused."""
    mask = neighborhood_mask(9, 4)
    assert mask.sum(dim=1).eq(4).all()  # every query sees exactly K keys (inward shift at the borders)
    assert mask[4].nonzero().flatten().tolist() == [2, 3, 4, 5]  # centre 4: two before, one after
    q = torch.randn(1, 2, 9, 4, dtype=torch.float64)
    out = neighborhood_attention(q, q, q, kernel_size=4)
    ref = neighborhood_attention_reference(q, q, q, kernel_size=4)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for bad, error in ((1, ValueError), (10, ValueError), (4.0, TypeError), (True, TypeError), (None, TypeError)):
        with pytest.raises(error, match="kernel_size"):
            neighborhood_attention(q, q, q, kernel_size=bad)
    with pytest.raises(ValueError, match="NATTEN's rule"):
        neighborhood_attention(q, q, q, kernel_size=1)
