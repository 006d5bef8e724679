"""bf16 causal ALiBi through FlashBias on CPU: exact rank-8 factors vs rank-2 factors cast to bf16.

Relative error of the bf16 output against a float64 dense-bias reference (H=4, N=4096, D=64).

    .venv/bin/python scripts/check_alibi_bf16.py
"""
import torch

from attnlab.ops import alibi_bias, alibi_bias_factors, flashbias_attention, softmax_attention

H, N, D = 4, 4096, 64
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, H, N, D, generator=g) for _ in range(3))
mask = alibi_bias(H, N).masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), float("-inf"))
ref = softmax_attention(q.double(), k.double(), v.double(), attn_mask=mask)
for label, (qb, kb) in {"exact bf16 factors (rank 8)": alibi_bias_factors(H, N, dtype=torch.bfloat16),
                        "rank-2 factors cast to bf16": [x.bfloat16() for x in alibi_bias_factors(H, N)]}.items():
    out = flashbias_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), q_bias=qb, k_bias=kb, causal=True)
    print(f"{label}: rel. err {float((out.double() - ref).norm() / ref.norm()):.1e}")
