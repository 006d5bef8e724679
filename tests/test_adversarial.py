"""Attention AT / iAT (Kitada & Iyatomi, "Attention Meets Perturbations", arXiv 2009.12064), the example."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from attnlab.adversarial import (
    attention_adversarial_loss,
    attention_adversarial_perturbation,
    attention_importance_correlation,
)
from attnlab.nn import AdditiveAttentionPooling

ROOT = Path(__file__).resolve().parents[1]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class TinyAttentionModel(torch.nn.Module):
    """Additive attention over given hidden states, then a linear read-out and a BCE loss."""

    def __init__(self, hidden: int = 6) -> None:
        super().__init__()
        self.score = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.Tanh(),
                                         torch.nn.Linear(hidden, 1, bias=False))
        self.out = torch.nn.Linear(hidden, 1)

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        return self.score(h).squeeze(-1)  # (B, T)

    def loss(self, h: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        attention = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        logits = self.out(torch.einsum("bt,bth->bh", attention, h)).squeeze(-1)
        return F.binary_cross_entropy_with_logits(logits, labels)


def batch(B: int = 4, T: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h = torch.randn(B, T, 6, generator=seeded(seed), dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    if B > 1:
        mask[1, 5:] = False
    if B > 2:
        mask[2, 3:] = False
    labels = torch.randint(0, 2, (B,), generator=seeded(seed + 1)).double()
    return h, mask, labels


def model_and_closure(seed: int = 0, B: int = 4, T: int = 7):
    torch.manual_seed(seed)
    model = TinyAttentionModel().double()
    h, mask, labels = batch(B, T, seed)
    scores = model.scores(h)
    return model, scores, mask, (lambda s: model.loss(h, s, mask, labels))


def test_at_matches_the_reference_code_two_step_procedure() -> None:
    model, scores, mask, loss_of = model_and_closure()
    result = attention_adversarial_loss(loss_of, scores, method="at", xi=0.7, mask=mask)
    # TanhBCAttentionAT: d_var = 0 (requires grad) added to the scores, backward, r = xi * normalize(d_var.grad)
    d_var = torch.zeros_like(scores, requires_grad=True)
    loss_of(scores.detach() + d_var).backward()
    expected_r = 0.7 * F.normalize(d_var.grad, dim=1)
    torch.testing.assert_close(result.perturbation, expected_r)
    torch.testing.assert_close(result.clean, loss_of(scores))
    torch.testing.assert_close(result.adversarial, loss_of(scores + expected_r))
    torch.testing.assert_close(result.total, result.clean + result.adversarial)  # lam = 1
    assert result.adversarial > result.clean  # a step up the loss


def test_at_norm_is_xi_per_example_and_padding_gets_none() -> None:
    model, scores, mask, loss_of = model_and_closure(seed=1)
    r = attention_adversarial_loss(loss_of, scores, xi=2.5, mask=mask).perturbation
    torch.testing.assert_close(r.norm(dim=1), torch.full((4,), 2.5, dtype=torch.float64))
    assert bool((r[~mask] == 0).all())


def test_at_on_one_token_sentences_changes_nothing() -> None:
    model, scores, mask, loss_of = model_and_closure(seed=2, T=1)
    mask = torch.ones_like(mask)
    result = attention_adversarial_loss(loss_of, scores, xi=1.0, mask=mask)
    torch.testing.assert_close(result.adversarial, result.clean)  # softmax over one token is 1


def test_iat_reference_code_is_at_with_the_opposite_sign() -> None:
    model, scores, mask, loss_of = model_and_closure(seed=3)
    at = attention_adversarial_loss(loss_of, scores, method="at", mask=mask).perturbation
    iat = attention_adversarial_loss(loss_of, scores, method="iat", mode="reference_code", mask=mask).perturbation
    torch.testing.assert_close(iat, -at)


def test_iat_paper_mode() -> None:
    model, scores, mask, loss_of = model_and_closure(seed=4, B=1)
    single = attention_adversarial_loss(loss_of, scores, method="iat", mode="paper", mask=mask)
    assert bool((single.perturbation == 0).all())  # one sentence: no difference direction, r = 0
    torch.testing.assert_close(single.adversarial, single.clean)

    model, scores, mask, loss_of = model_and_closure(seed=5, B=3)
    result = attention_adversarial_loss(loss_of, scores, method="iat", mode="paper", xi=1.5, mask=mask)
    r = result.perturbation
    torch.testing.assert_close(r.norm(dim=1), torch.full((3,), 1.5, dtype=torch.float64))
    s = scores.detach().masked_fill(~mask, 0.0)
    for i in range(3):  # r_i lies in the span of the differences to the other sentences
        basis = torch.stack([(s[i] - s[j]) * mask[i] for j in range(3) if j != i], dim=1)  # (T, 2)
        coefficients = torch.linalg.lstsq(basis, r[i][:, None]).solution
        torch.testing.assert_close(basis @ coefficients, r[i][:, None])
    d_var = torch.zeros_like(scores, requires_grad=True)
    loss_of(scores.detach() + d_var).backward()
    assert all(float(d_var.grad[i] @ r[i]) >= 0 for i in range(3))  # it does not decrease the loss to first order


def test_total_loss_trains_the_model_and_r_is_a_constant() -> None:
    model, scores, mask, loss_of = model_and_closure(seed=6)
    result = attention_adversarial_loss(loss_of, scores, method="iat", mode="paper", mask=mask)
    assert not result.perturbation.requires_grad
    result.total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_bad_arguments_raise() -> None:
    model, scores, mask, loss_of = model_and_closure(seed=7)
    with pytest.raises(ValueError, match="method='adv'"):
        attention_adversarial_loss(loss_of, scores, method="adv")
    with pytest.raises(ValueError, match="mode='code'"):
        attention_adversarial_loss(loss_of, scores, method="iat", mode="code")
    with pytest.raises(ValueError, match="xi must be"):
        attention_adversarial_loss(loss_of, scores, xi=-1.0)
    with pytest.raises(ValueError, match="mask must have the shape of scores"):
        attention_adversarial_loss(loss_of, scores, mask=mask[:, :3])
    with pytest.raises(ValueError, match="scalar"):
        attention_adversarial_loss(lambda s: s.sum(-1), scores)
    with pytest.raises(ValueError, match="gradient must have the shape"):
        attention_adversarial_perturbation(scores[:, :2], scores)


def test_attention_importance_correlation_is_pearson_over_real_tokens() -> None:
    a = torch.rand(3, 6, generator=seeded(8), dtype=torch.float64)
    b = torch.rand(3, 6, generator=seeded(9), dtype=torch.float64)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[2, 4:] = False
    corr = attention_importance_correlation(a, b, mask)
    for i, n in ((0, 6), (2, 4)):
        expected = torch.corrcoef(torch.stack([a[i, :n], b[i, :n]]))[0, 1]
        torch.testing.assert_close(corr[i], expected)


def load_example():
    path = ROOT / "examples" / "adversarial_text_classifier.py"
    spec = importlib.util.spec_from_file_location("adversarial_text_classifier", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_example_data_and_a_short_run() -> None:
    example = load_example()
    data = example.make_sentiment_data(50, seed=3)
    positive = (data.tokens >= 1) & (data.tokens <= 10)
    negative = (data.tokens >= 11) & (data.tokens <= 20)
    assert torch.equal(positive | negative, data.sentiment)
    majority_positive = positive.sum(1) > negative.sum(1)
    assert torch.equal(majority_positive.float(), data.labels)  # the label is the majority polarity
    results = example.main(["--methods", "vanilla", "at", "iat", "--train", "64", "--test", "32", "--epochs", "1"])
    assert set(results) == {"vanilla", "at", "iat"}
    for r in results.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["attention_on_sentiment"] <= 1.0



def test_additive_attention_pooling_is_the_papers_attention_layer() -> None:
    torch.manual_seed(10)
    layer = AdditiveAttentionPooling(8).double()
    assert layer.score[0].out_features == 4 and layer.score[2].bias is None  # W1: 8 -> 4, w2 without bias
    x = torch.randn(3, 5, 8, generator=seeded(11), dtype=torch.float64)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False
    context, attention = layer(x, key_padding_mask=mask)
    w1, b1, w2 = layer.score[0].weight, layer.score[0].bias, layer.score[2].weight
    scores = (torch.tanh(x @ w1.T + b1) @ w2.T).squeeze(-1)
    expected = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    torch.testing.assert_close(attention, expected)
    torch.testing.assert_close(context, torch.einsum("bt,btd->bd", expected, x))
    labels = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    readout = torch.randn(8, generator=seeded(12), dtype=torch.float64)

    def loss_of(s: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(layer.pool(x, s, mask)[0] @ readout, labels)

    result = attention_adversarial_loss(loss_of, layer.scores(x), mask=mask)
    assert bool((result.perturbation[0, 3:] == 0).all()) and result.adversarial > result.clean
    with pytest.raises(ValueError, match="scores must have shape"):
        layer.pool(x, scores[:, :4])


@pytest.mark.slow
def test_example_learns_the_task() -> None:
    # measured with the defaults: accuracy 0.984 (vanilla), 0.985 (at), 0.965 (iat)
    results = load_example().main(["--methods", "vanilla", "at", "iat"])
    assert all(r["accuracy"] > 0.9 for r in results.values()), results
