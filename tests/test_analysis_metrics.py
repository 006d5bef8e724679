"""Head importance (A3.3), context divergence / VHR (A5.4), attention vs saliency (A7.5), ICL regression (A8.5)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnlab.analysis import regression_patterns as rp
from attnlab.analysis.capture import capture
from attnlab.analysis.divergence import head_divergence, select_above_median, t_vhd, vhr_select, zero_outliers
from attnlab.analysis.hooks import intervene
from attnlab.analysis.importance import (
    ablation_importance,
    classification_importance,
    embedding_change_importance,
    gradient_importance,
    lm_loss_importance,
)
from attnlab.analysis.models import load_model, save_tiny_model
from attnlab.analysis.saliency import (
    attention_saliency_correlation,
    deletion_auc,
    gradient_x_input,
    max_pool_saliency,
    occlusion_saliency,
    pearson,
    spearman,
)
from attnlab.nn import Attention


class _Classifier(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.attn = Attention(16, 4)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        return self.head(self.attn(x).mean(1))


def test_pruning_a_head_with_zero_output_weights_changes_nothing():
    torch.manual_seed(0)
    model = _Classifier()
    with torch.no_grad():
        model.attn.to_out.weight[:, 8:12] = 0  # head 2's slice of W_O
    x = torch.randn(32, 6, 16)
    labels = torch.randint(0, 3, (32,))
    result = classification_importance(model, x, labels)
    assert result["delta_accuracy"][0, 2] == 0 and result["delta_confidence"][0, 2] == 0
    assert result["delta_accuracy_per_class"][:, 0, 2].abs().max() == 0
    assert result["delta_confidence"][0, [0, 1, 3]].abs().min() > 0  # the other heads matter


def test_ablation_importance_restores_the_model_and_gradient_proxy_vanishes_for_dead_head():
    torch.manual_seed(1)
    model = _Classifier()
    with torch.no_grad():
        model.attn.to_out.weight[:, 4:8] = 0
    x = torch.randn(8, 5, 16)
    with torch.no_grad():
        before = model(x)
    full, pruned = ablation_importance(model, lambda: float(model(x).pow(2).sum()))
    assert full == pytest.approx(float(before.pow(2).sum()))
    assert pruned[0, 1] == pytest.approx(full, rel=1e-6) and pruned[0, 0] != pytest.approx(full, rel=1e-6)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    grads = gradient_importance(model, [x, x * 2], lambda out, batch: out.pow(2).sum())
    assert grads[0, 1] == 0 and bool((grads[0, [0, 2, 3]] > 0).all())


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return load_model(str(save_tiny_model(tmp_path_factory.mktemp("llama"), kind="llama", layers=2, heads=4)))


def test_lm_loss_importance_and_embedding_change_on_tiny_models(tiny_llama, tmp_path):
    ids = tiny_llama.tokenizer("a few words to score with the language model", return_tensors="pt")["input_ids"]
    full, delta = lm_loss_importance(tiny_llama.model, ids)
    assert delta.shape == (2, 4) and full > 0 and delta.abs().max() > 0
    bert = load_model(str(save_tiny_model(tmp_path / "bert", kind="bert", layers=2, heads=2, dim=32)))
    inputs = bert.tokenizer(["one sentence", "and another one here"], return_tensors="pt", padding=True)
    change = embedding_change_importance(bert.model, dict(inputs))
    assert change.shape == (2, 2) and bool((change >= -1e-7).all()) and change.max() > 0


def test_vhd_is_zero_exactly_for_heads_that_ignore_the_context_segment():
    torch.manual_seed(2)
    model = nn.Module()
    model.attn = Attention(16, 4)
    model.forward = model.attn.forward  # type: ignore[method-assign]
    context = torch.randn(1, 4, 16)
    text = torch.randn(1, 5, 16)
    with_context = torch.cat([context, text], 1)

    def blind(scores, layer):  # heads 2 and 3 never attend to the 4 context tokens when they are present
        if scores.shape[-1] == 9:
            scores = scores.clone()
            scores[:, 2:, :, :4] = float("-inf")
        return scores

    with intervene(model, on_scores=blind):
        vhd = head_divergence(model, with_context, text)
    assert vhd.shape == (1, 4)
    assert vhd[0, 2:].max() < 1e-6 and vhd[0, :2].min() > 1e-3


def test_vhd_outlier_rule_median_selection_and_t_vhd():
    vhd = torch.tensor([[1.0, 1, 1, 10]])
    zeroed = zero_outliers(vhd, torch.tensor([[1.0, 1, 1, 10]]))
    assert zeroed.tolist() == [[1, 1, 1, 0]]
    assert not select_above_median(zeroed).any()  # ties at the median select nobody (documented)
    assert select_above_median(torch.tensor([[0.1, 0.5, 0.3, 0.9]])).tolist() == [[False, True, False, True]]
    assert t_vhd(torch.tensor([[1.0, 5, 3], [2, 2, 8]]), k=2) == 18.0


def test_vhr_select_picks_heads_above_the_median():
    torch.manual_seed(3)
    model = nn.Module()
    model.attn = Attention(16, 4)
    model.forward = model.attn.forward  # type: ignore[method-assign]
    text = torch.randn(1, 5, 16)
    full = torch.cat([torch.randn(1, 3, 16) * 3, text], 1)
    selection = vhr_select(model, full, text, layers=[0])
    vhd = selection.vhd[0]
    assert selection.heads[0] == [h for h in range(4) if vhd[h] > vhd.median()]
    assert set(selection.scales.values()) <= {2.0}


def test_pearson_spearman_and_pooling_known_answers():
    g = torch.Generator().manual_seed(0)
    ca = torch.rand(5, 9, generator=g)
    assert pearson(ca, ca).item() == pytest.approx(1.0)
    assert pearson(ca, -ca).item() == pytest.approx(-1.0)
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([1.0, 4, 9, 100])).item() == pytest.approx(1.0)
    # ties get average ranks: ranks [1.5, 1.5, 3] vs [1, 2, 3]
    expected = pearson(torch.tensor([1.5, 1.5, 3.0]), torch.tensor([1.0, 2.0, 3.0]))
    assert spearman(torch.tensor([2.0, 2.0, 5.0]), torch.tensor([0.1, 0.2, 0.3])).item() == pytest.approx(
        expected.item())
    sm = torch.zeros(2, 10, 4)
    sm[0, 7, 3] = 1
    pooled = max_pool_saliency(sm, factor=4)
    assert pooled.shape == (2, 3) and pooled[0, 1] == 1 and pooled.sum() == 1
    assert deletion_auc(torch.ones(21)) == pytest.approx(100.0)


def test_gradient_x_input_and_occlusion_on_a_linear_scorer():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, generator=g, dtype=torch.float64)
    e = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)

    def forward(x):
        return (x * w).sum((-1, -2))

    expected = (e * w).sum(-1)  # for a linear scorer both methods give e_t . w
    torch.testing.assert_close(gradient_x_input(forward, e), expected)
    torch.testing.assert_close(occlusion_saliency(forward, e), expected)


def test_attention_saliency_correlation_per_head():
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    model = nn.Module()
    model.attn = Attention(16, 4)
    model.forward = model.attn.forward  # type: ignore[method-assign]
    record = capture(model, torch.randn(1, 7, 16, generator=g), what=("probs",))
    row = record.probs[0][0, 1, -1]
    result = attention_saliency_correlation(record, row * 3)  # saliency proportional to head 1's row
    assert result["pearson"][0, 1].item() == pytest.approx(1.0)
    assert result["spearman"][0, 1].item() == pytest.approx(1.0)
    assert result["pearson"][0, 0].item() < 0.999


def _planted(omega, mu, d=5):
    eye = torch.eye(d + 1, dtype=torch.float64)
    eye[d, d] = 0
    w_q = torch.stack([eye * omega ** 0.5, eye * omega ** 0.5])
    w_k = torch.stack([eye * omega ** 0.5, -eye * omega ** 0.5])  # head 2: KQ = -omega I
    e_last = torch.zeros(d + 1, dtype=torch.float64)
    e_last[d] = 1
    w_v = torch.stack([torch.eye(d + 1, dtype=torch.float64)] * 2)
    w_o = torch.stack([mu * e_last, -mu * e_last])
    return w_q, w_k, w_v, w_o


def test_planted_pattern_hits_ideal_metrics_and_matches_debiased_gd():
    d, L, omega, mu = 5, 40, 0.01, 3.0
    w_q, w_k, w_v, w_o = _planted(omega, mu, d)
    kq, ov = rp.kq_ov(w_q, w_k, w_v, w_o)
    m = rp.pattern_metrics(kq, ov)
    torch.testing.assert_close(m["diag_ratio"], torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(m["last_entry_ratio"], torch.ones(2, dtype=torch.float64))
    assert m["homog"].abs().max() < 1e-12 and m["zero_sum"] == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(m["omega"], torch.tensor([omega, -omega], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, L, d, generator=g, dtype=torch.float64)
    beta = torch.randn(256, d, generator=g, dtype=torch.float64) / d ** 0.5
    y = torch.einsum("bld,bd->bl", x, beta)
    x_q = torch.randn(256, d, generator=g, dtype=torch.float64)
    z = torch.cat([x, y[..., None]], -1)
    z_q = torch.cat([x_q, torch.zeros(256, 1, dtype=torch.float64)], -1)
    out = rp.icl_attention_forward(z, z_q, w_q, w_k, w_v, w_o)
    dgd = rp.dgd_predict(x, y, x_q, omega / (d + 1) ** 0.5, mu)  # omega times the (d+1)^-1/2 scale
    assert ((out - dgd).norm() / dgd.norm()).item() < 1e-2


def test_ridge_recovers_beta_without_noise_and_risk_formula():
    g = torch.Generator().manual_seed(1)
    d, L = 5, 400
    x = torch.randn(3, L, d, generator=g, dtype=torch.float64)
    beta = torch.randn(3, d, generator=g, dtype=torch.float64)
    y = torch.einsum("bld,bd->bl", x, beta)
    x_q = torch.eye(d, dtype=torch.float64)[:3]
    torch.testing.assert_close(rp.ridge_predict(x, y, x_q, lam=1e-8), beta[torch.arange(3), torch.arange(3)],
                               atol=1e-3, rtol=0)
    assert rp.ridge_loss(0.0, 1e-9) == pytest.approx(0.0, abs=1e-6)  # d / L -> 0, no noise: no error
    assert rp.ridge_loss(0.3, 1e-9) == pytest.approx(0.3, rel=1e-6)  # only the noise of y_q is left


def test_ridge_risk_formula_matches_monte_carlo():
    g = torch.Generator().manual_seed(2)
    d, L, noise, n = 5, 40, 0.1, 3000
    x = torch.randn(n, L, d, generator=g, dtype=torch.float64)
    beta = torch.randn(n, d, generator=g, dtype=torch.float64) / d ** 0.5
    y = torch.einsum("bld,bd->bl", x, beta) + noise ** 0.5 * torch.randn(n, L, generator=g, dtype=torch.float64)
    x_q = torch.randn(n, d, generator=g, dtype=torch.float64)
    y_q = (x_q * beta).sum(-1) + noise ** 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    risk = (rp.ridge_predict(x, y, x_q, lam=noise * d) - y_q).pow(2).mean().item()
    assert risk == pytest.approx(rp.ridge_loss(noise, d / L), rel=0.08)


def test_icl_weights_from_the_benchmark_classifier_reproduce_its_scores_and_output():
    from attnlab.models import SequenceClassifier

    torch.manual_seed(4)
    d, L, H = 3, 6, 2
    model = SequenceClassifier(1, H * (d + 1), 1, H, max_len=L + 1, input_dim=d + 1, pooling="last",
                               mlp_ratio=0, norm=False, positions=False).double()
    with torch.no_grad():
        model.embed.bias.zero_()
    z = torch.randn(2, L + 1, d + 1, dtype=torch.float64)
    z[:, -1, -1] = 0  # the query token [x_q; 0]
    w_q, w_k, w_v, w_o = rp.icl_weights_from_classifier(model)
    kq, ov = rp.kq_ov(w_q, w_k, w_v, w_o)
    record = capture(model, z, what=("scores", "probs"))
    scores = torch.einsum("bi,hij,blj->bhl", z[:, -1], kq, z) * (d + 1) ** -0.5
    torch.testing.assert_close(record.scores[0][:, :, -1], scores)
    per_head = torch.einsum("bhl,blj,hj->b", record.probs[0][:, :, -1], z, ov)
    residual = z[:, -1] @ (model.head.weight @ model.embed.weight).T  # w_head E z_q
    torch.testing.assert_close(record.output[:, 0], per_head + residual[:, 0] + model.head.bias)
    assert set(rp.pattern_metrics(kq, ov)) == {"diag_ratio", "homog", "omega", "last_entry_ratio", "mu", "zero_sum"}
    with pytest.raises(ValueError, match="SequenceClassifier"):
        rp.icl_weights_from_classifier(nn.Linear(3, 3))
