"""Tests of lenalign.losses against direct float64 implementations of the published formulas.

The direct implementations below compute log-probabilities with a plain log-softmax and
the losses with log(sigmoid(.)), so they share no code with the package.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from lenalign import SequenceLogProbs, sequence_logprobs
from lenalign.backends import triton_runs_on
from lenalign.losses import (
    PreferenceLossOutput,
    preference_loss,
    preference_loss_from_hidden,
    preference_loss_from_logits,
    sequence_score,
)

IGNORE = -100
LAMBDAS = {"sum": 0.0, "mean": 1.0, 0.4: 0.4}
# hyperparameters that make each loss type's every term matter; sft_weight rides along
# with two of them so that its gradient is checked too
LOSS_PARAMS = {
    "sigmoid": {"beta": 0.3, "label_smoothing": 0.1},
    "ipo": {"beta": 0.4},
    "hinge": {"beta": 0.2},
    "rdpo": {"beta": 0.2, "alpha": 0.07, "sft_weight": 0.5},
    "simpo": {"beta": 2.0, "gamma": 0.5, "sft_weight": 0.3},
}


def preference_batch(seed: int, n_pairs: int = 3, steps: int = 7, vocab: int = 11):
    """Policy logits [2B, T, V] (requiring grad), reference logits, labels, completion mask.

    Rows have a 1-2 token prompt (masked out) and up to 2 padding labels, so that with
    shift=True every completion counts between 3 and 6 tokens and the lengths differ.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * n_pairs
    logits = 2.0 * torch.randn(rows, steps, vocab, generator=gen, dtype=torch.float64)
    ref_logits = logits + torch.randn(rows, steps, vocab, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, vocab, (rows, steps), generator=gen)
    prompt = torch.randint(1, 3, (rows,), generator=gen)
    end = torch.randint(steps - 2, steps + 1, (rows,), generator=gen)
    positions = torch.arange(steps)
    labels = torch.where(positions < end[:, None], labels, IGNORE)
    mask = positions >= prompt[:, None]
    return logits.requires_grad_(), ref_logits, labels, mask


def direct_logps(logits, labels, mask, shift):
    """[R] sums and [R] counts of the counted labels' log-probabilities, the textbook way."""
    logits = logits.to(torch.float64)
    if shift:
        logits, labels, mask = logits[:, :-1], labels[:, 1:], mask[:, 1:]
    log_probs = logits - logits.logsumexp(-1, keepdim=True)
    counted = (labels != IGNORE) & mask
    picked = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * counted).sum(-1), counted.sum(-1)


def direct_pair_losses(loss_type, lam, params, pol_w, pol_l, n_w, n_l, ref_w=None, ref_l=None):
    """[B] per-pair loss of ``loss_type`` written straight from its formula."""
    beta = params["beta"]

    def score(total, count):
        return total / count.to(torch.float64) ** lam

    if loss_type == "simpo":
        h = score(pol_w, n_w) - score(pol_l, n_l)
    else:
        h = (score(pol_w, n_w) - score(ref_w, n_w)) - (score(pol_l, n_l) - score(ref_l, n_l))
    if loss_type == "sigmoid":
        eps = params.get("label_smoothing", 0.0)
        losses = -(1 - eps) * torch.log(torch.sigmoid(beta * h)) - eps * torch.log(
            torch.sigmoid(-beta * h)
        )
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.clamp(1 - beta * h, min=0)
    elif loss_type == "rdpo":
        gap = (n_w - n_l).to(torch.float64)
        losses = -torch.log(torch.sigmoid(beta * h + params["alpha"] * gap))
    else:
        losses = -torch.log(torch.sigmoid(beta * h - params["gamma"]))
    return losses + params.get("sft_weight", 0.0) * -(pol_w / n_w)


def split(values):
    half = values.shape[0] // 2
    return values[:half], values[half:]


@pytest.mark.parametrize("length_normalization", list(LAMBDAS))
@pytest.mark.parametrize("loss_type", list(LOSS_PARAMS))
def test_loss_and_logit_gradient_match_direct_formula(loss_type, length_normalization):
    params = LOSS_PARAMS[loss_type]
    logits, ref_logits, labels, mask = preference_batch(seed=0)
    ref_logps = None
    if loss_type != "simpo":
        with torch.no_grad():
            ref_logps = sequence_logprobs(ref_logits, labels, mask, shift=True, backend="torch")

    out = preference_loss_from_logits(
        logits,
        labels,
        mask,
        ref_logps,
        shift=True,
        backend="torch",
        loss_type=loss_type,
        length_normalization=length_normalization,
        **params,
    )
    out.loss.backward()

    direct_logits = logits.detach().clone().requires_grad_()
    pol_sum, count = direct_logps(direct_logits, labels, mask, shift=True)
    ref_sum, _ = direct_logps(ref_logits, labels, mask, shift=True)
    (pol_w, pol_l), (n_w, n_l), (ref_w, ref_l) = split(pol_sum), split(count), split(ref_sum)
    direct_losses = direct_pair_losses(
        loss_type, LAMBDAS[length_normalization], params, pol_w, pol_l, n_w, n_l, ref_w, ref_l
    )
    direct_losses.mean().backward()

    # a loss or a gradient of zero would make the comparison vacuous
    assert direct_losses.mean().abs() > 1e-3
    assert direct_logits.grad.abs().max() > 1e-3
    torch.testing.assert_close(out.loss, direct_losses.mean(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logits.grad, direct_logits.grad, rtol=1e-9, atol=1e-12)
    assert out.loss.dtype == torch.float64
    assert torch.equal(out.chosen_lengths, n_w)
    assert torch.equal(out.rejected_lengths, n_l)


def test_triton_backend_matches_direct_formula():
    if not triton_runs_on(torch.device("cpu"))[0]:
        pytest.skip("the Triton kernels cannot run here")
    direct_logits, ref_logits, labels, mask = preference_batch(seed=0, n_pairs=2, steps=5, vocab=7)
    logits = direct_logits.detach().float().requires_grad_()
    ref_logits = ref_logits.float()
    with torch.no_grad():
        ref_logps = sequence_logprobs(ref_logits, labels, mask, shift=True)
    params = {"beta": 2.0}

    out = preference_loss_from_logits(
        logits, labels, mask, ref_logps, backend="triton", length_normalization="mean", **params
    )
    out.loss.backward()

    pol_sum, count = direct_logps(direct_logits, labels, mask, shift=True)
    ref_sum, _ = direct_logps(ref_logits, labels, mask, shift=True)
    direct = direct_pair_losses(
        "sigmoid", 1.0, params, *split(pol_sum), *split(count), *split(ref_sum)
    )
    direct.mean().backward()
    assert direct.mean().abs() > 1e-3
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss.double(), direct.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.grad.double(), direct_logits.grad, rtol=1e-4, atol=1e-6)


def padded_logps(seed: int, dtype=torch.float32) -> SequenceLogProbs:
    """Kernel output for 4 sequences of 0, 2, 3 and 5 counted tokens."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 5, 6, generator=gen, dtype=dtype)
    labels = torch.randint(0, 6, (4, 5), generator=gen)
    lengths = torch.tensor([0, 2, 3, 5])
    labels = torch.where(torch.arange(5) < lengths[:, None], labels, IGNORE)
    return sequence_logprobs(logits, labels, backend="torch")


def test_lambda_endpoints_reproduce_sum_and_mean_exactly():
    logps = padded_logps(seed=0)
    assert torch.equal(logps.count, torch.tensor([0, 2, 3, 5]))
    for zero in ("sum", 0.0, 0):
        assert torch.equal(sequence_score(logps, zero), logps.sum)
    for one in ("mean", 1.0, 1):
        assert torch.equal(sequence_score(logps, one), logps.mean)


def test_lambda_endpoints_give_the_same_loss_as_the_named_normalizations():
    chosen, rejected, ref_chosen, ref_rejected = (padded_logps(seed) for seed in range(4))
    for number, name in ((0.0, "sum"), (1.0, "mean")):
        by_number = preference_loss(
            chosen, rejected, ref_chosen, ref_rejected, length_normalization=number
        )
        by_name = preference_loss(
            chosen, rejected, ref_chosen, ref_rejected, length_normalization=name
        )
        for field_by_number, field_by_name in zip(by_number, by_name, strict=True):
            assert torch.equal(field_by_number, field_by_name)


def test_mean_normalization_scores_the_kernel_mean():
    # feeding the kernel's means as sums of one token each must give the same loss bit for bit
    chosen, rejected, ref_chosen, ref_rejected = (padded_logps(seed) for seed in range(4))

    def means_as_sums(logps):
        return SequenceLogProbs(logps.mean, logps.mean, torch.ones_like(logps.count))

    averaged = preference_loss(
        chosen, rejected, ref_chosen, ref_rejected, beta=2.0, length_normalization="mean"
    )
    summed_means = preference_loss(
        *(means_as_sums(logps) for logps in (chosen, rejected, ref_chosen, ref_rejected)),
        beta=2.0,
        length_normalization="sum",
    )
    assert averaged.loss != 0
    assert torch.equal(averaged.loss, summed_means.loss)


def test_intermediate_lambda_divides_by_count_to_the_lambda():
    logps = padded_logps(seed=1, dtype=torch.float64)
    score = sequence_score(logps, 0.5)
    expected = [
        0.0 if n == 0 else total / math.sqrt(n)
        for total, n in zip(logps.sum.tolist(), logps.count.tolist(), strict=True)
    ]
    assert all(value != 0.0 for value in expected[1:])
    torch.testing.assert_close(score, torch.tensor(expected, dtype=torch.float64))


def test_empty_sequence_scores_zero_with_a_finite_gradient():
    total = torch.tensor([-4.0, 0.0], dtype=torch.float64, requires_grad=True)
    logps = SequenceLogProbs(total, total.detach(), torch.tensor([4, 0]))
    score = sequence_score(logps, 0.5)
    score.sum().backward()
    assert score.tolist() == [-2.0, 0.0]
    assert total.grad.tolist() == [0.5, 0.0]


def repeat_completion_tokens(logits, labels, repeats):
    """Repeat every position of row r ``repeats[r]`` times; pad the rows to one length."""
    steps = max(logits.shape[1] * k for k in repeats)
    new_logits = torch.zeros(logits.shape[0], steps, logits.shape[2], dtype=logits.dtype)
    new_labels = torch.full((logits.shape[0], steps), IGNORE)
    for row, k in enumerate(repeats):
        length = logits.shape[1] * k
        new_logits[row, :length] = logits[row].repeat_interleave(k, dim=0)
        new_labels[row, :length] = labels[row].repeat_interleave(k, dim=0)
    return new_logits, new_labels


def dpo_loss_of(logits, ref_logits, labels, length_normalization):
    policy = sequence_logprobs(logits, labels, backend="torch")
    reference = sequence_logprobs(ref_logits, labels, backend="torch")
    halves = [split(field) for field in (policy.sum, policy.count, reference.sum)]
    (pol_w, pol_l), (n_w, n_l), (ref_w, ref_l) = halves
    return preference_loss(
        SequenceLogProbs(pol_w, pol_w / n_w, n_w),
        SequenceLogProbs(pol_l, pol_l / n_l, n_l),
        SequenceLogProbs(ref_w, ref_w / n_w, n_w),
        SequenceLogProbs(ref_l, ref_l / n_l, n_l),
        beta=1.0,
        length_normalization=length_normalization,
    ).loss


@pytest.mark.parametrize("seed", range(4))
def test_mean_dpo_loss_is_invariant_to_repeating_tokens_and_sum_is_not(seed):
    # the paper's point: under the averaging operator a completion whose every token is
    # said k times, with the same per-token log-probability, is worth the same
    gen = torch.Generator().manual_seed(seed)
    rows, steps, vocab = 6, 4, 9
    logits = 2.0 * torch.randn(rows, steps, vocab, generator=gen, dtype=torch.float64)
    ref_logits = logits + torch.randn(rows, steps, vocab, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, vocab, (rows, steps), generator=gen)
    repeats = torch.randint(1, 5, (rows,), generator=gen).tolist()
    repeats[0] = 3  # at least one completion is really repeated
    long_logits, long_labels = repeat_completion_tokens(logits, labels, repeats)
    long_ref_logits, _ = repeat_completion_tokens(ref_logits, labels, repeats)

    mean_loss = dpo_loss_of(logits, ref_logits, labels, "mean")
    long_mean_loss = dpo_loss_of(long_logits, long_ref_logits, long_labels, "mean")
    torch.testing.assert_close(long_mean_loss, mean_loss, rtol=1e-12, atol=0.0)

    sum_loss = dpo_loss_of(logits, ref_logits, labels, "sum")
    long_sum_loss = dpo_loss_of(long_logits, long_ref_logits, long_labels, "sum")
    assert abs(long_sum_loss - sum_loss) > 1e-3 * abs(sum_loss)


def hand_made_pairs():
    """Two pairs with round numbers, float64.

    pair 1: policy chosen -12 over 4 tokens, rejected -15 over 6; reference -13 and -14.
    pair 2: policy chosen -20 over 10 tokens, rejected -9 over 3; reference -18 and -10.
    """

    def logps(sums, counts):
        total = torch.tensor(sums, dtype=torch.float64)
        count = torch.tensor(counts)
        return SequenceLogProbs(total, total / count, count)

    return (
        logps([-12.0, -20.0], [4, 10]),
        logps([-15.0, -9.0], [6, 3]),
        logps([-13.0, -18.0], [4, 10]),
        logps([-14.0, -10.0], [6, 3]),
    )


def nll_of_sigmoid(x: float) -> float:
    """-log sigmoid(x)."""
    return math.log1p(math.exp(-x))


def test_trl_sigmoid_is_summed_dpo():
    # TRL loss_type="sigmoid" scores summed log-probs:
    # h1 = (-12 + 13) - (-15 + 14) = 2, h2 = (-20 + 18) - (-9 + 10) = -3
    out = preference_loss(*hand_made_pairs(), loss_type="sigmoid", beta=0.1)
    expected = (nll_of_sigmoid(0.1 * 2) + nll_of_sigmoid(0.1 * -3)) / 2  # 0.726247...
    assert out.loss.item() == pytest.approx(expected, rel=1e-14)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, -0.2], rel=1e-14)
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1, 0.1], rel=1e-14)
    assert out.margins.tolist() == pytest.approx([0.2, -0.3], rel=1e-14)
    assert out.accuracies.tolist() == [1.0, 0.0]
    assert out.chosen_lengths.tolist() == [4, 10]
    assert out.rejected_lengths.tolist() == [6, 3]


def test_trl_sigmoid_norm_is_averaged_dpo():
    # TRL loss_type="sigmoid_norm" divides each log-ratio by the completion's token count:
    # h1 = (-12 + 13)/4 - (-15 + 14)/6 = 5/12, h2 = (-20 + 18)/10 - (-9 + 10)/3 = -8/15
    out = preference_loss(*hand_made_pairs(), beta=5.0, length_normalization="mean")
    expected = (nll_of_sigmoid(5.0 * 5 / 12) + nll_of_sigmoid(5.0 * -8 / 15)) / 2  # 1.425597...
    assert out.loss.item() == pytest.approx(expected, rel=1e-14)
    assert out.margins.tolist() == pytest.approx([5.0 * 5 / 12, 5.0 * -8 / 15], rel=1e-14)


def test_trl_ipo_is_averaged_ipo():
    # TRL loss_type="ipo" averages the log-probs over the completion; with beta = 0.5 the
    # target 1/(2 beta) is 1: ((5/12 - 1)^2 + (-8/15 - 1)^2) / 2 = (49/144 + 529/225) / 2
    out = preference_loss(
        *hand_made_pairs(), loss_type="ipo", beta=0.5, length_normalization="mean"
    )
    assert out.loss.item() == pytest.approx((49 / 144 + 529 / 225) / 2, rel=1e-14)


def test_hinge_is_zero_beyond_the_margin():
    chosen, rejected, ref_chosen, ref_rejected = hand_made_pairs()
    policy_sum = chosen.sum.clone().requires_grad_()
    out = preference_loss(
        chosen._replace(sum=policy_sum), rejected, ref_chosen, ref_rejected, loss_type="hinge"
    )
    # beta = 0.1 puts the margin at h = 10: max(0, 1 - 0.2) and max(0, 1 + 0.3)
    assert out.loss.item() == pytest.approx((0.8 + 1.3) / 2, rel=1e-14)
    out = preference_loss(
        chosen._replace(sum=policy_sum),
        rejected,
        ref_chosen,
        ref_rejected,
        loss_type="hinge",
        beta=1.0,
    )
    out.loss.backward()
    # beta = 1: h1 = 2 clears the margin (loss 0, no gradient); h2 = -3 gives 1 + 3 = 4
    assert out.loss.item() == 2.0
    assert policy_sum.grad.tolist() == [0.0, -0.5]


def test_policy_equal_to_reference_gives_log_two_and_no_accuracy():
    chosen, rejected, _, _ = hand_made_pairs()
    out = preference_loss(chosen, rejected, chosen, rejected, beta=0.5)
    assert out.loss.item() == pytest.approx(math.log(2.0), rel=1e-14)
    assert out.margins.tolist() == [0.0, 0.0]
    # a tie is not a win
    assert out.accuracies.tolist() == [0.0, 0.0]


def test_simpo_and_sft_term_on_hand_made_numbers():
    chosen, rejected, _, _ = hand_made_pairs()
    # token means: chosen -3 and -2, rejected -2.5 and -3; beta 2, gamma 1:
    # pair 1: 2 (-3 + 2.5) - 1 = -2, pair 2: 2 (-2 + 3) - 1 = 1
    kwargs = {"loss_type": "simpo", "beta": 2.0, "gamma": 1.0, "length_normalization": "mean"}
    out = preference_loss(chosen, rejected, **kwargs)
    assert out.loss.item() == pytest.approx((nll_of_sigmoid(-2) + nll_of_sigmoid(1)) / 2)
    assert out.chosen_rewards.tolist() == pytest.approx([-6.0, -4.0], rel=1e-14)
    # the SFT term averages per-completion token means (3 and 2), not the batch's tokens
    # (32 / 14): 0.5 * (3 + 2) / 2 = 1.25
    with_sft = preference_loss(chosen, rejected, sft_weight=0.5, **kwargs)
    assert (with_sft.loss - out.loss).item() == pytest.approx(1.25, rel=1e-14)


def test_reference_is_constant_and_diagnostics_are_detached():
    chosen, rejected, ref_chosen, ref_rejected = hand_made_pairs()
    policy_sum = chosen.sum.clone().requires_grad_()
    ref_sum = ref_chosen.sum.clone().requires_grad_()
    out = preference_loss(
        chosen._replace(sum=policy_sum), rejected, ref_chosen._replace(sum=ref_sum), ref_rejected
    )
    out.loss.backward()
    assert policy_sum.grad is not None and policy_sum.grad.abs().min() > 0
    assert ref_sum.grad is None
    assert out.loss.requires_grad
    assert not any(field.requires_grad for field in out[1:])


@pytest.mark.parametrize("loss_type", list(LOSS_PARAMS))
def test_nan_propagates_to_the_loss_and_the_broken_pair(loss_type):
    chosen, rejected, ref_chosen, ref_rejected = hand_made_pairs()
    chosen = chosen._replace(sum=torch.tensor([math.nan, -20.0], dtype=torch.float64))
    refs = (None, None) if loss_type == "simpo" else (ref_chosen, ref_rejected)
    params = {key: value for key, value in LOSS_PARAMS[loss_type].items() if key != "sft_weight"}
    out = preference_loss(chosen, rejected, *refs, loss_type=loss_type, **params)
    assert out.loss.isnan()
    for diagnostic in (out.chosen_rewards, out.margins, out.accuracies):
        assert diagnostic[0].isnan() and diagnostic[1].isfinite()


def test_infinite_log_likelihood_is_not_masked():
    chosen, rejected, ref_chosen, ref_rejected = hand_made_pairs()
    chosen = chosen._replace(sum=torch.tensor([-math.inf, -20.0], dtype=torch.float64))
    out = preference_loss(chosen, rejected, ref_chosen, ref_rejected)
    assert out.loss.item() == math.inf
    empty_but_nan = SequenceLogProbs(
        torch.tensor([math.nan]), torch.tensor([math.nan]), torch.tensor([0])
    )
    assert sequence_score(empty_but_nan, "mean").isnan().all()


def test_score_dtype_is_the_promoted_input_dtype_at_least_float32():
    chosen, rejected, ref_chosen, ref_rejected = hand_made_pairs()

    def cast(logps, dtype):
        return logps._replace(sum=logps.sum.to(dtype))

    as_float32 = [cast(logps, torch.float32) for logps in hand_made_pairs()]
    assert preference_loss(*as_float32).loss.dtype == torch.float32
    mixed = preference_loss(*as_float32[:2], ref_chosen, ref_rejected)
    assert mixed.loss.dtype == torch.float64
    assert mixed.margins.dtype == torch.float64
    as_bfloat16 = [cast(logps, torch.bfloat16) for logps in (chosen, rejected)]
    assert sequence_score(as_bfloat16[0], "mean").dtype == torch.float32
    simpo = preference_loss(*as_bfloat16, loss_type="simpo", beta=2.0)
    assert simpo.loss.dtype == torch.float32


def test_from_logits_runs_one_kernel_call_on_the_whole_batch(monkeypatch):
    calls = []

    def counting_sequence_logprobs(logits, *args, **kwargs):
        calls.append(logits.shape[0])
        return sequence_logprobs(logits, *args, **kwargs)

    monkeypatch.setattr("lenalign.pair_batch.sequence_logprobs", counting_sequence_logprobs)
    logits, ref_logits, labels, mask = preference_batch(seed=3)
    ref_logps = sequence_logprobs(ref_logits, labels, mask, shift=True, backend="torch")
    out = preference_loss_from_logits(
        logits, labels, mask, ref_logps, backend="torch", length_normalization="mean", beta=2.0
    )
    assert calls == [6]

    halves = [
        sequence_logprobs(logits[rows], labels[rows], mask[rows], shift=True, backend="torch")
        for rows in (slice(0, 3), slice(3, 6))
    ]
    ref_halves = [SequenceLogProbs(*(split(field)[i] for field in ref_logps[:3])) for i in (0, 1)]
    separate = preference_loss(*halves, *ref_halves, length_normalization="mean", beta=2.0)
    assert isinstance(out, PreferenceLossOutput)
    torch.testing.assert_close(out.loss, separate.loss, rtol=1e-14, atol=0.0)
    assert torch.equal(out.chosen_lengths, separate.chosen_lengths)


def logps_of(sums, counts, device="cpu"):
    total = torch.tensor(sums, dtype=torch.float64, device=device)
    return SequenceLogProbs(total, total, torch.tensor(counts, dtype=torch.int64, device=device))


GOOD = hand_made_pairs()
THREE = logps_of([-1.0, -2.0, -3.0], [1, 2, 3])
META = logps_of([-1.0, -2.0], [1, 2], device="meta")

PREFERENCE_LOSS_ERRORS = [
    ("loss_type", GOOD, {"loss_type": "dpo"}),
    ("loss_type", GOOD, {"loss_type": None}),
    ("length_normalization", GOOD, {"length_normalization": -0.1}),
    ("length_normalization", GOOD, {"length_normalization": 1.5}),
    ("length_normalization", GOOD, {"length_normalization": math.nan}),
    ("length_normalization", GOOD, {"length_normalization": "avg"}),
    ("length_normalization", GOOD, {"length_normalization": True}),
    ("beta", GOOD, {"beta": 0.0}),
    ("beta", GOOD, {"beta": -0.1}),
    ("beta", GOOD, {"beta": math.inf}),
    ("beta", GOOD, {"beta": "0.1"}),
    ("gamma", GOOD, {"gamma": 0.5}),
    ("gamma", (*GOOD[:2], None, None), {"loss_type": "simpo", "gamma": math.nan}),
    ("alpha", GOOD, {"alpha": 0.1}),
    ("label_smoothing", GOOD, {"loss_type": "ipo", "label_smoothing": 0.1}),
    ("label_smoothing", GOOD, {"label_smoothing": 0.6}),
    ("label_smoothing", GOOD, {"label_smoothing": -0.1}),
    ("sft_weight", GOOD, {"sft_weight": -1.0}),
    ("ref_chosen", (*GOOD[:2], None, GOOD[3]), {}),
    ("ref_rejected", (*GOOD[:3], None), {"loss_type": "hinge"}),
    ("ref_chosen", GOOD, {"loss_type": "simpo"}),
    ("ref_rejected", (*GOOD[:2], None, GOOD[3]), {"loss_type": "simpo"}),
    ("policy_chosen", (GOOD[0].sum, *GOOD[1:]), {}),
    ("policy_chosen", (logps_of([], []), logps_of([], []), None, None), {"loss_type": "simpo"}),
    ("policy_chosen.sum", (GOOD[0]._replace(sum=GOOD[0].sum[None]), *GOOD[1:]), {}),
    ("policy_chosen.sum", (GOOD[0]._replace(sum=GOOD[0].count), *GOOD[1:]), {}),
    ("policy_chosen.count", (GOOD[0]._replace(count=GOOD[0].sum), *GOOD[1:]), {}),
    ("policy_chosen.count", (GOOD[0]._replace(count=GOOD[0].count[:1]), *GOOD[1:]), {}),
    ("policy_chosen.count", (GOOD[0]._replace(count=META.count), *GOOD[1:]), {}),
    ("policy_rejected", (GOOD[0], THREE, *GOOD[2:]), {}),
    ("ref_chosen", (*GOOD[:2], THREE, GOOD[3]), {}),
    ("ref_rejected", (*GOOD[:3], META), {}),
]


@pytest.mark.parametrize(("argument", "pairs", "kwargs"), PREFERENCE_LOSS_ERRORS)
def test_preference_loss_names_the_bad_argument(argument, pairs, kwargs):
    with pytest.raises(ValueError, match=rf"^{re.escape(argument)}: expected"):
        preference_loss(*pairs, **kwargs)


def test_sequence_score_names_the_bad_argument():
    with pytest.raises(ValueError, match=r"^length_normalization: expected"):
        sequence_score(GOOD[0], 2.0)
    with pytest.raises(ValueError, match=r"^logps: expected"):
        sequence_score(GOOD[0].sum, "mean")


def test_from_logits_names_the_bad_argument():
    logits, ref_logits, labels, mask = preference_batch(seed=0)
    ref_logps = sequence_logprobs(ref_logits, labels, mask, shift=True, backend="torch")
    cases = [
        ("logits", (logits[:5], labels[:5], mask[:5], ref_logps), {}),
        ("logits", (logits[0], labels[0], mask[0], ref_logps), {}),
        ("ref_logps", (logits, labels, mask, None), {}),
        ("ref_logps", (logits, labels, mask, ref_logps), {"loss_type": "simpo"}),
        ("ref_logps", (logits, labels, mask, GOOD[0]), {}),
        ("ref_logps", (logits, labels, mask, ref_logps.sum), {}),
        ("loss_type", (logits, labels, mask, ref_logps), {"loss_type": "kto"}),
        ("beta", (logits, labels, mask, ref_logps), {"beta": 0}),
        ("labels", (logits, labels[:, :-1], mask, ref_logps), {}),
    ]
    for argument, args, kwargs in cases:
        with pytest.raises(ValueError, match=rf"^{re.escape(argument)}: expected"):
            preference_loss_from_logits(*args, backend="torch", **kwargs)


def head_batch(seed: int, features: int = 5):
    """Hidden states [2B, T, H], head weight and bias (all float64 leaves), labels, mask."""
    _, ref_logits, labels, mask = preference_batch(seed)
    gen = torch.Generator().manual_seed(seed + 100)
    rows, steps, vocab = ref_logits.shape
    hidden = torch.randn(rows, steps, features, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, features, generator=gen, dtype=torch.float64)
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    return leaves, ref_logits, labels, mask


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
def test_from_hidden_equals_from_logits_of_the_head(loss_type):
    (hidden, weight, bias), ref_logits, labels, mask = head_batch(seed=4)
    ref_logps = None
    if loss_type != "simpo":
        ref_logps = sequence_logprobs(ref_logits, labels, mask, shift=True, backend="torch")
    params = {**LOSS_PARAMS[loss_type], "length_normalization": "mean"}

    out = preference_loss_from_hidden(
        hidden, weight, labels, mask, ref_logps, bias=bias, chunk_rows=4, backend="torch",
        loss_type=loss_type, **params,
    )  # fmt: skip
    out.loss.backward()
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    logits = torch.nn.functional.linear(*leaves)
    want = preference_loss_from_logits(
        logits, labels, mask, ref_logps, backend="torch", loss_type=loss_type, **params
    )
    want.loss.backward()

    assert want.loss.abs() > 1e-3
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-12, atol=1e-14)
    for got, expected in zip((hidden, weight, bias), leaves, strict=True):
        assert expected.grad.abs().max() > 1e-3
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-10, atol=1e-13)
    assert torch.equal(out.chosen_lengths, want.chosen_lengths)


def test_from_hidden_names_the_bad_argument():
    (hidden, weight, _), ref_logits, labels, mask = head_batch(seed=5)
    ref_logps = sequence_logprobs(ref_logits, labels, mask, shift=True, backend="torch")
    cases = [
        ("hidden", (hidden[:5], weight, labels[:5], mask[:5], ref_logps), {}),
        ("hidden", (hidden[0], weight, labels[0], mask[0], ref_logps), {}),
        ("ref_logps", (hidden, weight, labels, mask, None), {}),
        ("ref_logps", (hidden, weight, labels, mask, GOOD[0]), {}),
        ("weight", (hidden, weight[:, :-1], labels, mask, ref_logps), {}),
        ("chunk_rows", (hidden, weight, labels, mask, ref_logps), {"chunk_rows": 0}),
        ("loss_type", (hidden, weight, labels, mask, ref_logps), {"loss_type": "kto"}),
    ]
    for argument, args, kwargs in cases:
        with pytest.raises(ValueError, match=rf"^{re.escape(argument)}: expected"):
            preference_loss_from_hidden(*args, backend="torch", **kwargs)


def test_batch_entries_stay_importable_from_losses():
    import lenalign.losses
    import lenalign.pair_batch

    assert lenalign.losses.preference_loss_from_logits is preference_loss_from_logits
    assert (
        lenalign.losses.preference_loss_from_hidden
        is lenalign.pair_batch.preference_loss_from_hidden
    )
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        lenalign.losses.nothing_here  # noqa: B018
