"""What a benchmark case runs on: its shape, its preference batch and the call's types.

A case is one logits shape and dtype on one device (``CaseSpec``); ``make_workload``
builds its preference batch. The contenders turn a workload into a ``SequenceFn`` and the
case module times that function in one of the ``MODES``; both import this module, not
each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

FORWARD = "forward"
FORWARD_BACKWARD = "forward+backward"
MODES = (FORWARD, FORWARD_BACKWARD)

# what a contender computes: logits -> per-sequence (sum [B], mean [B])
SequenceFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# what one checked or timed call returns: (sum, mean, logits gradient or None)
StepOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


@dataclass(frozen=True)
class CaseSpec:
    """The shape, dtype and device of one case; picklable, so it can go to the worker."""

    batch: int
    steps: int
    vocab: int
    dtype: str
    device: str
    seed: int = 0

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.steps}x{self.vocab} {self.dtype}"


@dataclass
class Workload:
    """The preference batch of a case, shared by all contenders.

    ``logits`` is a leaf that requires grad; ``labels`` are valid tokens everywhere and
    ``mask`` marks one completion span per sequence, about half of the positions. The
    backward differentiates ``sum(weight_sum * seq_sum + weight_mean * seq_mean)`` so that
    a contender's gradients of both outputs, per sequence, are checked.
    """

    spec: CaseSpec
    logits: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    weight_sum: torch.Tensor
    weight_mean: torch.Tensor
    counted_rows: int
    pristine: torch.Tensor | None = field(default=None, repr=False)

    def keep_pristine(self) -> None:
        """Copy the logits to the host once, before a call that may overwrite them."""
        if self.pristine is None:
            self.pristine = self.logits.detach().to("cpu", copy=True)

    def restore(self) -> None:
        """Put the original logits back after a contender that wrote into them."""
        if self.pristine is not None:
            with torch.no_grad():
                self.logits.copy_(self.pristine)


def make_workload(spec: CaseSpec) -> Workload:
    """Random logits, labels and a completion mask counting about half of the positions."""
    device = torch.device(spec.device)
    dtype = getattr(torch, spec.dtype)
    batch, steps, vocab = spec.batch, spec.steps, spec.vocab
    generator = torch.Generator(device=device).manual_seed(spec.seed)
    logits = torch.randn((batch, steps, vocab), generator=generator, device=device, dtype=dtype)
    labels = torch.randint(0, vocab, (batch, steps), generator=generator, device=device)
    # a prompt, a completion of 40 to 60% of the steps, then padding; the completion never
    # starts at position 0, which the causal shift cannot score
    host = torch.Generator().manual_seed(spec.seed)
    lengths = (steps * (0.4 + 0.2 * torch.rand(batch, generator=host))).long().clamp(1, steps - 1)
    starts = (torch.rand(batch, generator=host) * (steps - lengths)).long() + 1
    positions = torch.arange(steps)
    mask = (positions >= starts[:, None]) & (positions < (starts + lengths)[:, None])
    weights = 0.5 + torch.rand(2, batch, generator=host)
    return Workload(
        spec=spec,
        logits=logits.requires_grad_(True),
        labels=labels,
        mask=mask.to(device),
        weight_sum=weights[0].to(device),
        weight_mean=weights[1].to(device),
        counted_rows=int(mask.sum()),
    )
