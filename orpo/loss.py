"""The ORPO loss (Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference
Model", arXiv:2403.07691).

For a prompt x with a preferred response y_w and a dispreferred response y_l, with
logp(y|x) = (1/m) sum_t log P(y_t | x, y_<t) the length-normalised log-probability of the m response tokens:

    odds(y|x)  = P(y|x) / (1 - P(y|x))                                  (eq. 4)
    OR(y_w, y_l) = odds(y_w|x) / odds(y_l|x)                            (eq. 5)
    L_OR  = -log sigmoid(log OR(y_w, y_l))                              (eq. 7)
    L     = E[L_SFT + lambda * L_OR]                                    (eq. 6)

so L = NLL(chosen) - lambda * mean(log sigmoid(log odds(y_w) - log odds(y_l))), where
log odds(y) = logp - log(1 - exp(logp)). The log1mexp below keeps that finite for logp near 0 (a response
the model is certain of) and for very negative logp.

`ORPOLoss` matches `trl.experimental.orpo.ORPOTrainer` (its `odds_ratio_loss` and the NLL of
`concatenated_forward`) when the NLL is taken over prompt + response (`nll_on_prompt=True`, the official
code's choice); tests/test_trl_equivalence.py checks this to 1e-5. The paper's equation takes the NLL over
the response only, which is our default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from orpo.logprobs import SequenceLogps, at_least_float32

_LN2 = math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, in float32 (float64 stays float64), accurate everywhere
    (Maechler 2012, "Accurately computing log(1 - exp(-|a|))").

    Near 0, 1 - exp(x) cancels catastrophically, so log(-expm1(x)) is used for x > -ln 2; for x <= -ln 2,
    exp(x) is small and log1p(-exp(x)) is exact. Each branch gets an input clamped into its own safe range,
    so the branch `torch.where` discards can never produce inf/NaN, and neither can its gradient.
    x = 0 gives -inf (a response of probability one has infinite odds); x > 0 is outside the domain.
    """
    x = at_least_float32(x)
    near_zero = x > -_LN2
    # -1.0 sits inside both branches' safe ranges; it only fills the lanes a branch does not own.
    x_near = torch.where(near_zero, x, torch.full_like(x, -1.0))
    x_far = torch.where(near_zero, torch.full_like(x, -1.0), x)
    return torch.where(near_zero, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


# The largest log-prob `log_odds` evaluates; see there. exp(-80.6) = 1e-35 is still a normal float32, so
# the loss's backward (sigmoid(-log odds) = 1e-35 x odds(rejected), times d log odds / d logp = 1e35) keeps
# its precision while log odds(rejected) > -6.7, and is finite (if less precise) for any value.
_MAX_LOGP = -1e-35


def log_odds(logps: torch.Tensor) -> torch.Tensor:
    """log(odds) = log(p / (1 - p)) = logp - log(1 - exp(logp)), in float32 (eq. 4 of the paper, in logs).

    A response the model is certain of has logp = 0.0 in float32 (reached at a ~17-nat margin), where log odds
    is +inf and its derivative 1 / (1 - p) too: the loss's log sigmoid turns +inf into a finite value, but its
    backward multiplies sigmoid(-inf) = 0 by inf, a NaN that clipping and AdamW would spread to every weight.
    So logp is evaluated at min(logp, -1e-35), with the gradient passed straight through: values and
    gradients are unchanged below -1e-35, and above it they are those at -1e-35, which agree with the limits
    as logp -> 0 of everything finite (the loss and its gradient, -lambda * odds(rejected) per pair) to a
    relative 1e-35.
    """
    logps = at_least_float32(logps)
    # (logps - logps.detach()) is 0 with gradient 1; a where, not a clamp: -inf must stay -inf, not NaN.
    capped = torch.where(logps > _MAX_LOGP, logps - logps.detach() + _MAX_LOGP, logps)
    return capped - log1mexp(capped)


@dataclass
class ORPOOutput:
    """What one ORPO loss evaluation produced. Per-pair tensors have shape (B,); scalars are 0-d.

    `loss` carries the gradient; everything else is detached.
    """

    loss: torch.Tensor  # NLL - lambda * mean log sigmoid(log odds ratio)
    nll_loss: torch.Tensor  # nll_sum / nll_tokens of this micro-batch (the normalisers do not change it)
    log_odds_ratio: torch.Tensor  # mean over pairs of log sigmoid(log odds(chosen) - log odds(rejected))
    log_odds_chosen: torch.Tensor  # mean over pairs of log odds(chosen) - log odds(rejected)
    chosen_rewards: torch.Tensor  # (B,) lambda * logp(chosen)
    rejected_rewards: torch.Tensor  # (B,) lambda * logp(rejected)
    chosen_logps: torch.Tensor  # (B,) length-normalised logp of the chosen responses
    rejected_logps: torch.Tensor  # (B,)
    nll_sum: torch.Tensor  # summed token NLL of this micro-batch (for exact cross-batch normalisation)
    nll_tokens: torch.Tensor  # number of tokens in nll_sum
    log_sigmoid_ratio: torch.Tensor  # (B,) per-pair log sigmoid(log odds ratio)

    orpo_lambda: float = 0.1  # the lambda these rewards were scaled by

    def sums(self) -> dict[str, torch.Tensor]:
        """This micro-batch's summable statistics (`PAIR_SUM_KEYS`), 0-d tensors: add them over micro-batches
        and processes, then `metrics_from_sums` divides once."""
        pairs = self.chosen_logps.shape[0]
        return {
            "nll_sum": self.nll_sum,
            "nll_tokens": self.nll_tokens,
            "pairs": torch.tensor(float(pairs), device=self.nll_sum.device),
            "log_sigmoid_sum": self.log_sigmoid_ratio.sum(),
            "log_ratio_sum": self.log_odds_chosen * pairs,  # held as its mean
            "chosen_logps_sum": self.chosen_logps.sum(),
            "rejected_logps_sum": self.rejected_logps.sum(),
            "correct": (self.chosen_rewards > self.rejected_rewards).sum(),  # TRL's accuracy: rewards, not logps
        }

    def metrics(self) -> dict[str, float]:
        """This micro-batch's metrics under TRL's names (means over its pairs).

        To aggregate exactly across micro-batches or processes, add up `sums()` and call `metrics_from_sums`
        once, instead of averaging these means.
        """
        return metrics_from_sums({name: float(value) for name, value in self.sums().items()}, self.orpo_lambda)


class ORPOLoss(nn.Module):
    """ORPO loss: L = L_NLL(chosen) - lambda * mean(log sigmoid(log odds(chosen) - log odds(rejected))).

    Args:
        orpo_lambda: weight of the odds-ratio term (the paper's lambda; TRL's `beta`). Default 0.1.

    Normalisation, for gradient accumulation and data parallelism. By default the NLL is divided by this
    micro-batch's NLL token count and the odds-ratio term is averaged over its pairs, exactly like TRL.
    To make k micro-batches on P processes equal one big batch, pass the totals of the whole optimizer step:

        nll_normalizer = global count of NLL tokens in the step (sum of `seq.nll_tokens` over all micro-batches
                         and processes; gather them before the step, e.g. accelerator.gather)
        pair_normalizer = global number of pairs in the step

    and then each micro-batch's loss is its share of the global loss; summing them over micro-batches gives
    the step's loss. Two things rescale what reaches the gradients: DDP averages gradients over processes
    (multiply the loss by the number of processes before backward), and `Accelerator.backward` divides the
    loss by the Accelerator's own `gradient_accumulation_steps` when that is > 1 (multiply it back, or keep
    that setting at 1 and accumulate yourself).
    """

    def __init__(self, orpo_lambda: float = 0.1) -> None:
        super().__init__()
        self.orpo_lambda = orpo_lambda

    def forward(
        self,
        seq: SequenceLogps,
        num_pairs: int,
        *,
        nll_normalizer: float | torch.Tensor | None = None,
        pair_normalizer: float | torch.Tensor | None = None,
    ) -> ORPOOutput:
        """`seq.logps` holds the B chosen then the B rejected sequences (B = num_pairs)."""
        if seq.logps.shape[0] != 2 * num_pairs:
            raise ValueError(
                f"expected 2 * num_pairs = {2 * num_pairs} sequence log-probs (chosen then rejected), "
                f"got {seq.logps.shape[0]}"
            )
        chosen_logps = at_least_float32(seq.logps[:num_pairs])
        rejected_logps = at_least_float32(seq.logps[num_pairs:])

        nll_sum = at_least_float32(seq.nll_sum)
        nll_tokens = at_least_float32(seq.nll_tokens)
        nll_den = nll_tokens.clamp(min=1.0) if nll_normalizer is None else nll_normalizer
        nll_loss = nll_sum / nll_den

        # Eq. 7: log sigmoid of the log odds ratio; each log odds through the stable log1mexp.
        log_ratio = log_odds(chosen_logps) - log_odds(rejected_logps)
        log_sigmoid_ratio = F.logsigmoid(log_ratio)
        pair_den = float(num_pairs) if pair_normalizer is None else pair_normalizer
        loss = nll_loss - self.orpo_lambda * log_sigmoid_ratio.sum() / pair_den

        return ORPOOutput(
            loss=loss,
            nll_loss=(nll_sum / nll_tokens.clamp(min=1.0)).detach(),
            log_odds_ratio=log_sigmoid_ratio.detach().mean(),
            log_odds_chosen=log_ratio.detach().mean(),
            chosen_rewards=(self.orpo_lambda * chosen_logps).detach(),
            rejected_rewards=(self.orpo_lambda * rejected_logps).detach(),
            chosen_logps=chosen_logps.detach(),
            rejected_logps=rejected_logps.detach(),
            nll_sum=nll_sum.detach(),
            nll_tokens=nll_tokens.detach(),
            log_sigmoid_ratio=log_sigmoid_ratio.detach(),
            orpo_lambda=self.orpo_lambda,
        )


# The summed statistics every ORPO metric is computed from, in this order wherever they travel as a vector.
PAIR_SUM_KEYS = (
    "nll_sum", "nll_tokens", "pairs", "log_sigmoid_sum", "log_ratio_sum", "chosen_logps_sum",
    "rejected_logps_sum", "correct",
)


def metrics_from_sums(sums: dict[str, float], orpo_lambda: float) -> dict[str, float]:
    """The ORPO metrics under TRL's names from summed statistics (`PAIR_SUM_KEYS`): each mean is one division
    of sums, so sums over micro-batches and processes give the metrics of the whole batch. The one place the
    metric formulas live."""
    pairs = max(sums["pairs"], 1.0)
    nll = sums["nll_sum"] / max(sums["nll_tokens"], 1.0)
    log_odds_ratio = sums["log_sigmoid_sum"] / pairs
    chosen = sums["chosen_logps_sum"] / pairs
    rejected = sums["rejected_logps_sum"] / pairs
    return {
        "loss": nll - orpo_lambda * log_odds_ratio,  # eq. 6
        "nll_loss": nll,
        "log_odds_ratio": log_odds_ratio,
        "log_odds_chosen": sums["log_ratio_sum"] / pairs,
        "rewards/chosen": orpo_lambda * chosen,
        "rewards/rejected": orpo_lambda * rejected,
        "rewards/accuracies": sums["correct"] / pairs,
        "rewards/margins": orpo_lambda * (chosen - rejected),
        "logps/chosen": chosen,
        "logps/rejected": rejected,
    }
