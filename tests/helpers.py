"""Shared test helpers: an independent float64 ground truth and input builders."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path
from types import ModuleType

import torch

BACKENDS = ("torch", "triton")
# compiled kernels on a GPU; on CPU the kernels run under TRITON_INTERPRET (tests/conftest.py)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def naive_sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    cu_seqlens: torch.Tensor | None = None,
):
    """The semantics of ``sequence_logprobs``, written position by position in float64.

    Deliberately shares no code with lenalign: it walks every sequence and every label
    position as the specification reads. Returns (sum, mean, count, token_logprobs) with
    token_logprobs in the labels' shape; differentiable in ``logits`` by plain autograd.
    """
    vocab = logits.shape[-1]
    if cu_seqlens is None:
        sequences = [
            (logits[b], labels[b], None if mask is None else mask[b]) for b in range(len(logits))
        ]
        flat_offsets = [b * labels.shape[1] for b in range(len(logits))]
    else:
        flat_logits = logits.reshape(-1, vocab)
        flat_labels = labels.reshape(-1)
        flat_mask = None if mask is None else mask.reshape(-1)
        bounds = [int(b) for b in cu_seqlens]
        sequences = [
            (
                flat_logits[lo:hi],
                flat_labels[lo:hi],
                None if flat_mask is None else flat_mask[lo:hi],
            )
            for lo, hi in itertools.pairwise(bounds)
        ]
        flat_offsets = bounds[:-1]
    device = logits.device
    sums, counts, token_values = [], [], {}
    for (seq_logits, seq_labels, seq_mask), offset in zip(sequences, flat_offsets, strict=True):
        total = torch.zeros((), dtype=torch.float64, device=device)
        count = 0
        for t in range(len(seq_labels)):
            label = int(seq_labels[t])
            if label == ignore_index or (seq_mask is not None and not bool(seq_mask[t])):
                continue
            if shift and t == 0:
                continue
            row = seq_logits[t - 1] if shift else seq_logits[t]
            value = torch.log_softmax(row.to(torch.float64), dim=-1)[label]
            token_values[offset + t] = value
            total = total + value
            count += 1
        sums.append(total)
        counts.append(count)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    seq_sum = torch.stack(sums) if sums else zero.new_zeros(0)
    seq_count = torch.tensor(counts, dtype=torch.int64, device=device)
    seq_mean = (
        torch.stack([s / c if c else zero for s, c in zip(sums, counts, strict=True)])
        if sums
        else zero.new_zeros(0)
    )
    flat_tokens = [token_values.get(p, zero) for p in range(labels.numel())]
    tokens = (
        torch.stack(flat_tokens).reshape(labels.shape)
        if flat_tokens
        else zero.new_zeros(labels.shape)
    )
    return seq_sum, seq_mean, seq_count, tokens


def random_problem(
    batch: int,
    steps: int,
    vocab: int,
    *,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    scale: float = 3.0,
    masked_fraction: float = 0.3,
    ignored_fraction: float = 0.2,
):
    """Random logits [B, T, V], labels with some ignore_index, and a random bool mask."""
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, steps, vocab, generator=generator) * scale).to(dtype)
    labels = torch.randint(0, vocab, (batch, steps), generator=generator)
    ignored = torch.rand(batch, steps, generator=generator) < ignored_fraction
    labels[ignored] = -100
    mask = torch.rand(batch, steps, generator=generator) >= masked_fraction
    return logits.to(DEVICE), labels.to(DEVICE), mask.to(DEVICE)


def upstream_gradients(n_seq: int, label_shape, seed: int = 1):
    """Nonzero random upstream gradients for (sum, mean, token_logprobs)."""
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n_seq, generator=generator, dtype=torch.float64).to(DEVICE),
        torch.randn(n_seq, generator=generator, dtype=torch.float64).to(DEVICE),
        torch.randn(label_shape, generator=generator, dtype=torch.float64).to(DEVICE),
    )


def weighted_objective(seq_sum, seq_mean, token_logprobs, weights) -> torch.Tensor:
    """A float64 scalar that sends distinct gradients through sum, mean and token_logprobs."""
    w_sum, w_mean, w_token = weights
    return (
        (seq_sum.double() * w_sum).sum()
        + (seq_mean.double() * w_mean).sum()
        + (token_logprobs.double() * w_token).sum()
    )


def load_benchmark_script(name: str) -> ModuleType:
    """Import benchmarks/<name>.py, a script rather than a package module."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"lenalign_benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
