"""DPOTrainer's per-pair losses, on length-normalized scores, plus lenalign's simpo and rdpo.

Each formula is the one trl 1.16's ``DPOTrainer._compute_loss`` writes, with its summed
log-likelihoods replaced by the scores s(y) = sum / |y|**lambda (so that with lambda = 0
every loss is DPOTrainer's, to rounding). Notation, per pair of a chosen y_w and a
rejected y_l:

    r_w = s_pol(y_w) - s_ref(y_w),  r_l = s_pol(y_l) - s_ref(y_l)   (the log-ratios)
    u_w, u_l = f'(r_w), f'(r_l) under the f-divergence (identity for reverse KL)
    delta = u_w - u_l

TRL's ``ipo`` and ``sigmoid_norm`` divide u by the completion mask's token count
themselves (lambda = 0 only, config.resolve_settings), and ``sft`` is the token-mean NLL
of the batch's chosen completions, which no normalization changes.

Beside the formulas (``pair_loss``, ``f_divergence_scores``), the scores they take:
``normalized_scores`` (s = sum / count**lambda), ``ld_dpo_sums`` (LD-DPO's weighted
sums) and ``wpo_weights`` (WPO's pair weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn.functional import logsigmoid

from ...losses import sequence_score
from ...outputs import SequenceLogProbs

# exp(t) must stay finite in the alpha-divergence once cast back (TRL's bounds)
ALPHA_DIVERGENCE_CLAMP = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0}


@dataclass(frozen=True)
class PairScores:
    """The per-pair inputs of every loss type, [B] tensors unless said otherwise.

    Attributes:
        policy_chosen, policy_rejected: s_pol(y_w), s_pol(y_l), differentiable.
        ref_chosen, ref_rejected: s_ref(y_w), s_ref(y_l), constants; None when no loss
            type needs the reference (SimPO alone).
        chosen_lengths, rejected_lengths: the scored token counts |y_w|, |y_l| (float).
        chosen_mask_tokens, rejected_mask_tokens: ``completion_mask.sum(1)``, what TRL's
            ipo and sigmoid_norm divide by (one more than |y| only for an empty prompt,
            whose first completion token has no context to be scored from).
        sft_nll: [] token-mean negative log-likelihood of all the batch's chosen tokens.
    """

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    chosen_mask_tokens: torch.Tensor
    rejected_mask_tokens: torch.Tensor
    sft_nll: torch.Tensor

    @property
    def chosen_logratios(self) -> torch.Tensor:
        """r_w = s_pol(y_w) - s_ref(y_w)."""
        return self.policy_chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> torch.Tensor:
        """r_l = s_pol(y_l) - s_ref(y_l)."""
        return self.policy_rejected - self.ref_rejected


def f_divergence_scores(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    f_divergence_type: str,
    alpha_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(u_w, u_l) = f'(r) of the f-DPO regularizer, elementwise on the [B] log-ratios."""
    if f_divergence_type == "reverse_kl":
        return chosen_logratios, rejected_logratios
    if f_divergence_type == "forward_kl":
        # f'(t) = 1 - 1/t at t = exp(r)
        return 1 - torch.exp(-chosen_logratios), 1 - torch.exp(-rejected_logratios)
    if f_divergence_type == "js_divergence":
        # f'(t) = log(2t / (t + 1)) = log 2 + log sigmoid(r)
        return (
            math.log(2) + logsigmoid(chosen_logratios),
            math.log(2) + logsigmoid(rejected_logratios),
        )
    if f_divergence_type == "alpha_divergence":
        # f'(t) = (t**(alpha - 1) - 1) / (alpha - 1); at alpha = 1 its limit, log t
        if abs(alpha_coef - 1.0) < 1e-6:
            return chosen_logratios, rejected_logratios
        return (
            _alpha_score(chosen_logratios, alpha_coef),
            _alpha_score(rejected_logratios, alpha_coef),
        )
    raise ValueError(
        "f_divergence_type: expected 'reverse_kl', 'forward_kl', 'js_divergence' or "
        f"'alpha_divergence', got {f_divergence_type!r}"
    )


def _alpha_score(logratios: torch.Tensor, alpha_coef: float) -> torch.Tensor:
    exponent = (alpha_coef - 1.0) * logratios
    bound = ALPHA_DIVERGENCE_CLAMP[exponent.dtype]
    grown = torch.exp(torch.clamp(exponent.float(), max=bound)) - 1.0
    return grown.to(exponent.dtype) / (alpha_coef - 1.0)


def _smoothed_logistic(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)."""
    return -logsigmoid(z) * (1 - epsilon) - logsigmoid(-z) * epsilon


def pair_loss(
    loss_type: str,
    scores: PairScores,
    delta: torch.Tensor | None,
    divergence_scores: tuple[torch.Tensor, torch.Tensor] | None,
    *,
    beta: float,
    label_smoothing: float,
    discopop_tau: float,
    simpo_gamma: float,
    rdpo_alpha: float,
) -> torch.Tensor:
    """[B] loss of each pair under ``loss_type`` (its formula in docs/integrations.md).

    ``delta`` is u_w - u_l and ``divergence_scores`` (u_w, u_l); both None when the batch
    has no reference (SimPO alone).
    """
    if loss_type == "simpo":
        margin = scores.policy_chosen - scores.policy_rejected
        return -logsigmoid(beta * margin - simpo_gamma)
    if loss_type == "sft":
        return scores.sft_nll.expand(scores.policy_chosen.shape[0])
    chosen, rejected = scores.chosen_logratios, scores.rejected_logratios
    if loss_type == "sigmoid":
        return -logsigmoid(beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type in ("ipo", "sigmoid_norm"):
        chosen_score, rejected_score = divergence_scores
        averaged = chosen_score / scores.chosen_mask_tokens.clamp(min=1.0) - (
            rejected_score / scores.rejected_mask_tokens.clamp(min=1.0)
        )
        if loss_type == "ipo":
            # beta is IPO's tau: the averaged margin is regressed onto 1 / (2 tau)
            return (averaged - 1 / (2 * beta)) ** 2
        return -logsigmoid(beta * averaged)
    if loss_type == "exo_pair":
        # KL(softmax of beta * delta over the pair || [1 - eps, eps]), EXO's eq. 16 at K = 2
        z = beta * delta
        return torch.sigmoid(z) * (logsigmoid(z) - math.log1p(-label_smoothing)) + (
            torch.sigmoid(-z) * (logsigmoid(-z) - math.log(label_smoothing))
        )
    if loss_type == "nca_pair":
        return (
            -logsigmoid(beta * chosen)
            - 0.5 * logsigmoid(-beta * chosen)
            - 0.5 * logsigmoid(-beta * rejected)
        )
    if loss_type == "robust":
        # the unbiased estimator under labels flipped with probability eps
        z = beta * delta
        flipped = label_smoothing * logsigmoid(-z)
        return (-(1 - label_smoothing) * logsigmoid(z) + flipped) / (1 - 2 * label_smoothing)
    if loss_type == "bco_pair":
        return -logsigmoid(beta * chosen) - logsigmoid(-beta * rejected)
    if loss_type == "sppo_hard":
        return (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2
    if loss_type == "aot":
        policy_sorted, _ = torch.sort(scores.policy_chosen - scores.policy_rejected, dim=0)
        ref_sorted, _ = torch.sort(scores.ref_chosen - scores.ref_rejected, dim=0)
        return _smoothed_logistic(beta * (policy_sorted - ref_sorted), label_smoothing)
    if loss_type == "aot_unpaired":
        chosen_sorted, _ = torch.sort(chosen, dim=0)
        rejected_sorted, _ = torch.sort(rejected, dim=0)
        return _smoothed_logistic(beta * (chosen_sorted - rejected_sorted), label_smoothing)
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * chosen) + torch.sigmoid(beta * rejected)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * chosen) + 1 - torch.sigmoid(beta * (chosen - rejected))
    if loss_type == "discopop":
        z = beta * delta
        modulation = torch.sigmoid(z / discopop_tau)
        return -logsigmoid(z) * (1 - modulation) + torch.exp(-z) * modulation
    if loss_type == "rdpo":
        length_gap = scores.chosen_lengths - scores.rejected_lengths
        return -logsigmoid(beta * delta + rdpo_alpha * length_gap)
    raise ValueError(f"loss_type: expected a known loss type, got {loss_type!r}")


def normalized_scores(sums: torch.Tensor, counts: torch.Tensor, exponent: float) -> torch.Tensor:
    """[S] s = sums / counts**exponent through lenalign's own score, 0 where nothing is
    counted; float32 (float64 for float64 sums), differentiable in ``sums``."""
    return sequence_score(SequenceLogProbs(sum=sums, mean=sums, count=counts), exponent)


def ld_dpo_sums(
    token_logprobs: torch.Tensor, completion_mask: torch.Tensor, ld_alpha: float
) -> torch.Tensor:
    """[2B] LD-DPO's sequence log-likelihoods: the tokens within the pair's shorter
    completion count fully, the rest times ``ld_alpha``.

    Args:
        token_logprobs: [2B, T] float per-position log-probabilities aligned with the
            labels (0 where not counted), chosen rows first.
        completion_mask: [2B, T] integer, 1 on completion tokens.
        ld_alpha: the weight of the verbose tail, in [0, 1].
    """
    per_token = token_logprobs[:, 1:]
    mask = completion_mask[:, 1:]
    positions = mask.cumsum(dim=1)
    lengths = mask.sum(dim=1)
    n_pairs = lengths.shape[0] // 2
    shared = torch.minimum(lengths[:n_pairs], lengths[n_pairs:]).repeat(2).unsqueeze(1)
    shared_part = (per_token * ((positions > 0) & (positions <= shared))).sum(dim=1)
    tail_part = (per_token * (positions > shared)).sum(dim=1)
    return shared_part + ld_alpha * tail_part


def wpo_weights(policy: SequenceLogProbs) -> torch.Tensor:
    """[B] WPO's pair weights (no gradient): exp of the mean over each completion of
    log p(y_t) - log sum_v p(v)**2, chosen times rejected; ``policy`` carries
    ``token_logprobs`` and ``token_stats`` [2B, T]."""
    with torch.no_grad():
        aligned = policy.token_logprobs - policy.token_stats.log_sum_sq_probs
        weights = torch.exp(aligned.sum(dim=1) / policy.count.clamp_min(1))
    chosen, rejected = weights.chunk(2, dim=0)
    return chosen * rejected
