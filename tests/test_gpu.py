"""GPU-only: more than 2**31 logits, where 32-bit element offsets would wrap around."""

from __future__ import annotations

import pytest
import torch

from lenalign import sequence_logprobs

pytestmark = pytest.mark.gpu


def _chunked_truth(logits, labels, counted, chunk_rows=1024):
    """fp32 log-probabilities and d(sum of them)/dlogits of selected rows, chunk by chunk."""
    logprob = torch.zeros(labels.shape, dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        log_probs = torch.log_softmax(logits[rows].float(), dim=-1)
        picked = log_probs.gather(1, labels[rows].clamp(min=0)[:, None]).squeeze(1)
        logprob[rows] = torch.where(counted[rows], picked, 0.0)
    return logprob


def _row_grad_truth(row_logits, label):
    probs = torch.softmax(row_logits.float(), dim=-1)
    grad = -probs
    grad[label] += 1.0
    return grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_more_than_2_to_the_31_logits_bf16():
    steps, vocab = 17 * 1024, 128 * 1024  # 2.28e9 elements: 4.6 GB of bf16 logits
    assert steps * vocab > 2**31
    generator = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(1, steps, vocab, device="cuda", dtype=torch.bfloat16, generator=generator)
    labels = torch.randint(0, vocab, (1, steps), device="cuda", generator=generator)
    mask = torch.rand(1, steps, device="cuda", generator=generator) < 0.5
    checked_rows = (0, steps // 2, steps - 3, steps - 2)  # the last ones lie past 2**31
    mask[0, [row + 1 for row in checked_rows]] = True
    # past 2**31 too, and not counted: a gradient written to the wrong row would land here
    uncounted_row = steps - 4
    mask[0, uncounted_row + 1] = False
    logits.requires_grad_(True)
    out = sequence_logprobs(logits, labels, mask, shift=True, return_token_logprobs=True)

    counted = mask[0].clone()
    counted[0] = False
    shifted_labels = torch.cat([labels[0, 1:], labels.new_zeros(1)])
    truth_rows = _chunked_truth(
        logits[0].detach(), shifted_labels, torch.cat([counted[1:], counted.new_zeros(1)])
    )
    truth_tokens = torch.cat([truth_rows.new_zeros(1), truth_rows[:-1]])
    torch.testing.assert_close(out.token_logprobs[0], truth_tokens, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        out.sum, truth_tokens.double().sum()[None].float(), rtol=1e-5, atol=0.0
    )
    assert int(out.count) == int(counted.sum())

    out.sum.sum().backward()
    grad = logits.grad[0]
    for row in checked_rows:
        expected = _row_grad_truth(logits[0, row].detach(), int(labels[0, row + 1]))
        # every entry, not only the label's: the others are softmax values near 1/V (about
        # 8e-6, the smallest near 5e-8), so the bound is relative (bf16 rounds by 2**-8) with
        # an absolute floor below them all (a row of zeros, or of another row's values, fails)
        torch.testing.assert_close(grad[row].float(), expected, rtol=1e-2, atol=1e-9)
        assert float(expected.abs().min()) > 1e-9  # the floor is below every entry
    assert bool((grad[uncounted_row] == 0).all()), "an uncounted row past 2**31"
    assert bool((grad[-1] == 0).all()), "the last row of a shifted sequence has no label"
