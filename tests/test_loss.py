"""ORPO loss: the stable log1mexp, log odds, hand-computed loss values, and gradients against finite differences."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch

from orpo.logprobs import SequenceLogps, model_sequence_logps
from orpo.loss import ORPOLoss, log1mexp, log_odds

LN2 = math.log(2.0)
EPS32 = 2e-7


def _seq(chosen: list[float], rejected: list[float], nll_sum: float, nll_tokens: float) -> SequenceLogps:
    logps = torch.tensor(chosen + rejected, dtype=torch.float32)
    return SequenceLogps(
        logps=logps,
        nll_sum=torch.tensor(nll_sum),
        nll_tokens=torch.tensor(nll_tokens),
        completion_tokens=torch.ones_like(logps),
    )


@pytest.mark.parametrize("x", [-1e-9, -1e-6, -1e-3, -0.5, -LN2 + EPS32, -LN2, -LN2 - EPS32, -1.0, -20.0, -50.0, -200.0])
def test_log1mexp_matches_float64_reference_and_has_finite_gradient(x: float) -> None:
    value = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    got = log1mexp(value)
    got.backward()
    x32 = mpmath.mpf(float(value.detach()))  # the float32 number actually evaluated
    with mpmath.workdps(60):  # the naive formula, in 60 digits: an independent reference
        expected = float(mpmath.log(1 - mpmath.exp(x32)))
        # d/dx log(1 - e^x) = -e^x / (1 - e^x)
        expected_grad = float(-mpmath.exp(x32) / (1 - mpmath.exp(x32)))
    assert got.dtype == torch.float32
    assert math.isfinite(got.item()) and math.isfinite(value.grad.item())
    assert got.item() == pytest.approx(expected, rel=1e-6, abs=1e-45)
    assert value.grad.item() == pytest.approx(expected_grad, rel=1e-5, abs=1e-45)


def test_log1mexp_vectorised_and_naive_formula_fails_where_it_must_not() -> None:
    x = torch.tensor([-1e-9, -50.0], dtype=torch.float32)
    naive = torch.log(1 - torch.exp(x))
    assert not torch.isfinite(naive[0])  # the cancellation the stable form avoids
    stable = log1mexp(x)
    assert torch.isfinite(stable).all()
    assert stable[0].item() == pytest.approx(math.log(1e-9), rel=1e-5)
    assert stable[1].item() == pytest.approx(-math.exp(-50.0), rel=1e-5)


def test_log1mexp_upcasts_half_precision_and_zero_gives_minus_inf() -> None:
    assert log1mexp(torch.tensor([-0.1], dtype=torch.bfloat16)).dtype == torch.float32
    assert log1mexp(torch.tensor([0.0])).item() == -math.inf


@pytest.mark.parametrize("p", [1e-20, 1e-3, 0.25, 0.5, 0.9, 1 - 1e-6])
def test_log_odds_equals_log_p_over_one_minus_p(p: float) -> None:
    logp = torch.tensor(math.log(p), dtype=torch.float32)
    p32 = math.exp(float(logp))
    assert log_odds(logp).item() == pytest.approx(math.log(p32) - math.log1p(-p32), rel=1e-5, abs=1e-5)


def test_orpo_loss_matches_hand_computed_values() -> None:
    """Two pairs, lambda = 0.1, NLL sum 3.0 over 2 tokens.

    Pair 1: chosen p = 1/2 -> odds 1, log odds 0; rejected p = 1/4 -> odds 1/3, log odds -ln 3.
            log odds ratio = ln 3, log sigmoid(ln 3) = ln(3/(3+1)) = ln 0.75.
    Pair 2: chosen p = 1/5 -> odds 1/4, log odds -ln 4; rejected p = 1/2 -> log odds 0.
            log odds ratio = -ln 4, log sigmoid(-ln 4) = ln(1/(1+4)) = ln 0.2.
    nll_loss = 3.0 / 2 = 1.5
    log_odds_ratio = (ln 0.75 + ln 0.2) / 2 = ln(0.15) / 2 = -1.8971200 / 2 = -0.9485600
    loss = 1.5 - 0.1 * (-0.9485600) = 1.5948560
    log_odds_chosen = (ln 3 - ln 4) / 2 = ln(0.75) / 2 = -0.1438410
    rewards/chosen = 0.1 * (ln 0.5 + ln 0.2) / 2 = 0.1 * ln(0.1) / 2 = -0.1151293
    rewards/rejected = 0.1 * (ln 0.25 + ln 0.5) / 2 = 0.1 * ln(0.125) / 2 = -0.1039721
    rewards/margins = -0.1151293 - (-0.1039721) = -0.0111572
    rewards/accuracies: pair 1 -0.0693 > -0.1386 yes, pair 2 -0.1609 > -0.0693 no -> 0.5
    logps/chosen = (ln 0.5 + ln 0.2) / 2 = -1.1512925, logps/rejected = (ln 0.25 + ln 0.5) / 2 = -1.0397208
    """
    seq = _seq([math.log(0.5), math.log(0.2)], [math.log(0.25), math.log(0.5)], nll_sum=3.0, nll_tokens=2.0)
    out = ORPOLoss(orpo_lambda=0.1)(seq, num_pairs=2)
    expected = {
        "loss": 1.5948560,
        "nll_loss": 1.5,
        "log_odds_ratio": -0.9485600,
        "log_odds_chosen": -0.1438410,
        "rewards/chosen": -0.1151293,
        "rewards/rejected": -0.1039721,
        "rewards/accuracies": 0.5,
        "rewards/margins": -0.0111572,
        "logps/chosen": -1.1512925,
        "logps/rejected": -1.0397208,
    }
    metrics = out.metrics()
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=2e-6), name
    assert out.chosen_rewards.shape == (2,) and not out.chosen_rewards.requires_grad


def test_orpo_loss_normalisers_make_micro_batches_add_up_to_the_full_batch() -> None:
    full = _seq([-0.3, -1.2, -2.0], [-0.9, -0.4, -3.0], nll_sum=10.0, nll_tokens=7.0)
    loss_fn = ORPOLoss(orpo_lambda=0.25)
    whole = loss_fn(full, num_pairs=3).loss
    first = _seq([-0.3], [-0.9], nll_sum=4.0, nll_tokens=3.0)
    second = _seq([-1.2, -2.0], [-0.4, -3.0], nll_sum=6.0, nll_tokens=4.0)
    micro = ((first, 1), (second, 2))
    parts = sum(loss_fn(s, num_pairs=n, nll_normalizer=7.0, pair_normalizer=3).loss for s, n in micro)
    assert float(parts) == pytest.approx(float(whole), rel=1e-6)
    # Without the normalisers each micro-batch is its own mean (TRL's behaviour), which differs here.
    local = sum(loss_fn(s, num_pairs=n).loss for s, n in micro) / 2
    assert abs(float(local) - float(whole)) > 1e-3


def test_orpo_loss_rejects_mismatched_pair_count() -> None:
    with pytest.raises(ValueError, match="2 \\* num_pairs"):
        ORPOLoss()(_seq([-1.0], [-2.0], 1.0, 1.0), num_pairs=2)


def test_orpo_loss_stays_finite_for_near_certain_and_hopeless_responses() -> None:
    seq = _seq([-1e-8], [-60.0], nll_sum=1e-8, nll_tokens=1.0)
    seq.logps.requires_grad_(True)
    out = ORPOLoss()(seq, num_pairs=1)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(seq.logps.grad).all()


@pytest.mark.parametrize("x", [0.0, -1e-30])
def test_log_odds_at_certainty_is_finite_in_value_and_gradient(x: float) -> None:
    value = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    got = log_odds(value)
    got.backward()
    assert math.isfinite(got.item()) and math.isfinite(value.grad.item())
    if x < 0:  # log odds has a value here (it tends to +inf as logp -> 0, so 0.0 has none)
        x32 = mpmath.mpf(float(value.detach()))
        with mpmath.workdps(60):
            expected = float(x32 - mpmath.log(1 - mpmath.exp(x32)))  # 69.0776 = -ln(1e-30)
            expected_grad = float(1 / (1 - mpmath.exp(x32)))  # 1e30
        assert got.item() == pytest.approx(expected, rel=1e-6)
        assert value.grad.item() == pytest.approx(expected_grad, rel=1e-5)


def test_log_odds_of_an_impossible_response_stays_minus_inf() -> None:
    assert log_odds(torch.tensor([-math.inf])).item() == -math.inf


@pytest.mark.parametrize("chosen", [0.0, -1e-30])
def test_orpo_loss_at_certainty_has_the_analytic_limits(chosen: float) -> None:
    """A chosen response of probability ~1 (mean logp 0.0 or -1e-30 in float32), rejected logp = ln 0.2.

    As logp_c -> 0, log odds_c -> +inf, so log sigmoid(log odds_c - log odds_r) -> 0 and the loss -> NLL.
    The gradient: d/dlogp_c of -lambda log sigmoid(L_c - L_r) = -lambda sigmoid(L_r - L_c) L_c', with
    sigmoid(L_r - L_c) ~ odds_r exp(-L_c) = odds_r (1 - p_c) e^-logp_c and L_c' = 1 / (1 - p_c), so it tends to
    -lambda odds_r = -0.5 * 0.25 = -0.125; d/dlogp_r = lambda sigmoid(L_r - L_c) L_r' -> 0. Both hold at
    -1e-30 to a relative 1e-30, and 0.0 must give the limits instead of a NaN gradient.
    """
    seq = _seq([chosen], [math.log(0.2)], nll_sum=0.3, nll_tokens=2.0)
    seq.logps.requires_grad_(True)
    out = ORPOLoss(orpo_lambda=0.5)(seq, num_pairs=1)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(seq.logps.grad).all()
    assert out.loss.item() == pytest.approx(0.15, abs=1e-7)  # the NLL, 0.3 / 2
    assert out.log_odds_ratio.item() == pytest.approx(0.0, abs=1e-7)
    assert seq.logps.grad[0].item() == pytest.approx(-0.125, rel=1e-5)
    assert seq.logps.grad[1].item() == pytest.approx(0.0, abs=1e-7)


def _tiny_batch(tokenizer, num_pairs: int = 2):
    from orpo.collate import PreferenceCollator, tokenize_pair

    examples = [
        {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "I am not sure."},
        {"prompt": "Add two and two.", "chosen": "Two plus two equals four.", "rejected": "Five, I think, or six."},
    ][:num_pairs]
    features = [tokenize_pair(e, tokenizer, max_length=64, max_prompt_length=32) for e in examples]
    return PreferenceCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)(features)


def _float64_norms(model: torch.nn.Module) -> None:
    """transformers' RMSNorm computes in float32 even for a float64 model; that rounding (1e-7) would swamp
    a finite difference, so the norms here compute in the input's dtype (the same function, in float64)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        variance = hidden.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = forward.__get__(module)


@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_loss_gradients_match_finite_differences_on_tiny_model(nll_on_prompt: bool) -> None:
    """float64 tiny Llama: the directional derivative of the ORPO loss along a random direction, by autograd
    through the chunked log-prob path, equals a central finite difference."""
    from orpo.models import build_tiny_llama

    model, tokenizer = build_tiny_llama(seed=0, hidden_size=32, layers=1)
    model = model.double().eval()
    _float64_norms(model)
    batch = _tiny_batch(tokenizer)
    loss_fn = ORPOLoss(orpo_lambda=0.5)

    def loss() -> torch.Tensor:
        seq = model_sequence_logps(model, batch, nll_on_prompt=nll_on_prompt, chunk_size=5)
        return loss_fn(seq, num_pairs=batch["num_pairs"]).loss

    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    loss().backward()
    generator = torch.Generator().manual_seed(1)
    direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
    analytic = sum(float((p.grad * d).sum()) for p, d in zip(params, direction, strict=True))

    step = 1e-6
    with torch.no_grad():
        for p, d in zip(params, direction, strict=True):
            p.add_(step * d)
        plus = float(loss())
        for p, d in zip(params, direction, strict=True):
            p.sub_(2 * step * d)
        minus = float(loss())
        for p, d in zip(params, direction, strict=True):
            p.add_(step * d)
    numeric = (plus - minus) / (2 * step)
    assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-8)

    # And one single output-embedding entry, whose gradient comes only through the chunked backward.
    weight = model.get_output_embeddings().weight
    token = int(batch["input_ids"][0][batch["completion_mask"][0].bool()][0])  # a response token of pair 1
    with torch.no_grad():
        weight[token, 3] += step
        plus = float(loss())
        weight[token, 3] -= 2 * step
        minus = float(loss())
        weight[token, 3] += step
    assert float(weight.grad[token, 3]) == pytest.approx((plus - minus) / (2 * step), rel=1e-5, abs=1e-9)
