"""Every rejected input raises ValueError naming the argument, with what was expected."""

from __future__ import annotations

import pytest
import torch

import lenalign.kernels
from lenalign import sequence_logprobs


def _problem(batch=2, steps=4, vocab=5):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, steps, vocab, generator=generator)
    labels = torch.randint(0, vocab, (batch, steps), generator=generator)
    return logits, labels


def _packed(n_rows=6, vocab=5):
    logits, labels = _problem(1, n_rows, vocab)
    return logits[0], labels[0]


CASES = {
    "logits not a tensor": (lambda: (([[0.0]], torch.zeros(1, dtype=torch.long)), {}), "logits"),
    "logits integer": (
        lambda: ((torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long)), {}),
        "logits",
    ),
    "logits 2-D without cu_seqlens": (lambda: (_packed(), {}), "logits"),
    "logits 4-D": (
        lambda: ((torch.randn(1, 2, 3, 4), torch.zeros(1, 2, 3, dtype=torch.long)), {}),
        "logits",
    ),
    "packed logits with batch 2": (
        lambda: (_problem(2, 3), {"cu_seqlens": torch.tensor([0, 3])}),
        "logits",
    ),
    "empty vocabulary": (
        lambda: ((torch.randn(1, 2, 0), torch.zeros(1, 2, dtype=torch.long)), {}),
        "logits",
    ),
    "labels float": (lambda: ((_problem()[0], _problem()[1].float()), {}), "labels"),
    "labels shape": (lambda: ((_problem()[0], _problem()[1][:, :-1]), {}), "labels"),
    "labels device": (lambda: ((_problem()[0], _problem()[1].to("meta")), {}), "labels"),
    "label above vocab": (
        lambda: ((_problem()[0], _problem()[1].index_fill(1, torch.tensor([2]), 5)), {}),
        "labels",
    ),
    "negative label": (
        lambda: ((_problem()[0], _problem()[1].index_fill(1, torch.tensor([2]), -3)), {}),
        "labels",
    ),
    "mask float": (lambda: (_problem(), {"mask": torch.ones(2, 4)}), "mask"),
    "mask shape": (lambda: (_problem(), {"mask": torch.ones(2, 3, dtype=torch.bool)}), "mask"),
    "mask device": (
        lambda: (_problem(), {"mask": torch.ones(2, 4, dtype=torch.bool, device="meta")}),
        "mask",
    ),
    "cu_seqlens float": (
        lambda: (_packed(), {"cu_seqlens": torch.tensor([0.0, 6.0])}),
        "cu_seqlens",
    ),
    "cu_seqlens 2-D": (lambda: (_packed(), {"cu_seqlens": torch.tensor([[0, 6]])}), "cu_seqlens"),
    "cu_seqlens empty": (
        lambda: (_packed(), {"cu_seqlens": torch.zeros(0, dtype=torch.long)}),
        "cu_seqlens",
    ),
    "cu_seqlens not from 0": (
        lambda: (_packed(), {"cu_seqlens": torch.tensor([1, 6])}),
        "cu_seqlens",
    ),
    "cu_seqlens short of N": (
        lambda: (_packed(), {"cu_seqlens": torch.tensor([0, 5])}),
        "cu_seqlens",
    ),
    "cu_seqlens decreasing": (
        lambda: (_packed(), {"cu_seqlens": torch.tensor([0, 4, 3, 6])}),
        "cu_seqlens",
    ),
    "cu_seqlens device": (
        lambda: (_packed(), {"cu_seqlens": torch.tensor([0, 6], device="meta")}),
        "cu_seqlens",
    ),
    "ignore_index not int": (lambda: (_problem(), {"ignore_index": -100.0}), "ignore_index"),
    "ignore_index beyond int64": (lambda: (_problem(), {"ignore_index": 2**70}), "ignore_index"),
    "shift not bool": (lambda: (_problem(), {"shift": 1}), "shift"),
    "return_token_logprobs not bool": (
        lambda: (_problem(), {"return_token_logprobs": "yes"}),
        "return_token_logprobs",
    ),
    "inplace_backward not bool": (
        lambda: (_problem(), {"inplace_backward": 1}),
        "inplace_backward",
    ),
    "unknown backend": (lambda: (_problem(), {"backend": "cuda"}), "backend"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_names_the_argument(case):
    build, argument = CASES[case]
    args, kwargs = build()
    with pytest.raises(ValueError, match=rf"^{argument}: expected .+, got .+"):
        sequence_logprobs(*args, **kwargs)


def test_out_of_range_label_message_gives_value_and_position():
    logits, labels = _problem()
    labels[1, 2] = 9
    with pytest.raises(ValueError, match=r"labels: .*\[0, 5\).* got 9 at position \(1, 2\)"):
        sequence_logprobs(logits, labels)


def test_out_of_range_labels_are_fine_where_not_counted():
    logits, labels = _problem()
    labels[0, 0] = 12345
    labels[1, 3] = -7
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 3] = False
    out = sequence_logprobs(logits, labels, mask, shift=True)  # (0, 0) is a first position
    assert out.count.tolist() == [3, 2]


def test_triton_backend_where_triton_cannot_run(monkeypatch):
    monkeypatch.setattr(lenalign.kernels, "INTERPRETED", False)
    logits, labels = _problem()
    with pytest.raises(ValueError, match=r"^backend: 'triton' cannot run here: .*TRITON_INTERPRET"):
        sequence_logprobs(logits, labels, backend="triton")
    # "auto" falls back to the torch backend instead of failing
    assert sequence_logprobs(logits, labels, backend="auto").count.tolist() == [4, 4]
