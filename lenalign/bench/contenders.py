"""The implementations ``lenalign bench`` compares, each behind one small interface.

A contender turns a workload (labels, completion mask, causal shift) into a function of
the logits that returns the per-sequence (sum, mean) of the label log-likelihoods, the
way its users would write it. Third-party contenders import their package lazily and,
where it is missing or cannot run on the device, say why instead of disappearing.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lenalign import reference_sequence_logprobs, sequence_logprobs
from lenalign.backends import triton_runs_on
from lenalign.checks import fail

from .workload import FORWARD_BACKWARD, MODES, SequenceFn, Workload

# the label value the third-party contenders are told to ignore
IGNORE_INDEX = -100
# the distributions of the third-party contenders, whose versions each run records
CONTENDER_DISTRIBUTIONS = ("liger-kernel", "trl")


@dataclass(frozen=True)
class Contender:
    """One implementation of the per-sequence log-likelihoods of a preference batch.

    Attributes:
        name: the name on the command line and in the table.
        summary: one line saying what runs.
        build: given a workload, returns ``fn(logits) -> (sum [B], mean [B])``.
        unavailable: given the device, returns why the contender cannot run there, or None.
        modes: the modes in which it differs from the others (an in-place backward
            changes nothing in a forward-only run, so it is measured with backward only).
        overwrites_logits: whether a call may write into the logits' storage.
    """

    name: str
    summary: str
    build: Callable[[Workload], SequenceFn]
    unavailable: Callable[[torch.device], str | None] = lambda device: None
    modes: tuple[str, ...] = MODES
    overwrites_logits: bool = False


def _eager(workload: Workload) -> SequenceFn:
    def run(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = reference_sequence_logprobs(logits, workload.labels, workload.mask, shift=True)
        return out.sum, out.mean

    return run


def _compiled(workload: Workload) -> SequenceFn:
    compiled = torch.compile(reference_sequence_logprobs)

    def run(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Past the recompile limit dynamo would quietly run the eager code and the table
        # would show eager times under the compile name; make that an error (and so a
        # failure) instead, for these calls only: the setting is process-wide, and
        # lenalign's torch backend compiles too.
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            out = compiled(logits, workload.labels, workload.mask, shift=True)
        return out.sum, out.mean

    return run


def _lenalign(backend: str, inplace_backward: bool) -> Callable[[Workload], SequenceFn]:
    def build(workload: Workload) -> SequenceFn:
        def run(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = sequence_logprobs(
                logits,
                workload.labels,
                workload.mask,
                shift=True,
                backend=backend,
                inplace_backward=inplace_backward,
            )
            return out.sum, out.mean

        return run

    return build


def _triton_unavailable(device: torch.device) -> str | None:
    if device.type == "cpu":
        return (
            "the Triton kernels need a GPU; on CPU they only run in Triton's interpreter "
            "(TRITON_INTERPRET=1), which checks semantics but is far too slow to time"
        )
    usable, reason = triton_runs_on(device)
    return None if usable else reason


def _missing(package: str, distribution: str) -> str | None:
    if importlib.util.find_spec(package) is None:
        return f"{distribution} is not installed (pip install {distribution})"
    return None


def _import_failure(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as error:  # any import-time failure makes the contender unusable
        return f"importing {module} failed: {type(error).__name__}: {error}"
    return None


def _liger_unavailable(device: torch.device) -> str | None:
    reason = _missing("liger_kernel", "liger-kernel")
    if reason is None and device.type != "cuda":
        reason = (
            f"liger-kernel's cross entropy is a Triton kernel for CUDA; the logits are on {device}"
        )
    return reason or _import_failure("liger_kernel.transformers.functional")


def _liger(workload: Workload) -> SequenceFn:
    from liger_kernel.transformers.functional import liger_cross_entropy

    labels, mask = workload.labels, workload.mask
    batch, steps, vocab = workload.logits.shape

    def run(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Row r scores the label at r + 1: shifting the labels instead of slicing the logits
        # keeps [B * T, V] a view, so the contender is not charged for a copy it need not make.
        targets = torch.full_like(labels, IGNORE_INDEX)
        targets[:, :-1] = torch.where(mask[:, 1:], labels[:, 1:], IGNORE_INDEX)
        nll = liger_cross_entropy(
            logits.reshape(-1, vocab),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        )
        # summing a 16-bit loss would round the sums; a careful caller upcasts first
        seq_sum = -nll.float().reshape(batch, steps).sum(1)
        count = (targets != IGNORE_INDEX).sum(1)
        return seq_sum, seq_sum / count.clamp(min=1)

    return run


def _trl_unavailable(device: torch.device) -> str | None:
    reason = _missing("trl", "trl") or _import_failure("trl.trainer.utils")
    if reason is None and not hasattr(
        importlib.import_module("trl.trainer.utils"), "selective_log_softmax"
    ):
        reason = "this version of trl has no trl.trainer.utils.selective_log_softmax"
    return reason


def _trl(workload: Workload) -> SequenceFn:
    from trl.trainer.utils import selective_log_softmax

    labels, mask = workload.labels, workload.mask

    def run(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # TRL's DPO recipe: score the labels from position 1 with the logits up to T - 1,
        # point masked positions at token 0, then zero their log-probabilities
        loss_mask = mask[:, 1:]
        index = torch.where(loss_mask, labels[:, 1:], 0)
        per_token = selective_log_softmax(logits[:, :-1], index)
        seq_sum = per_token.float().masked_fill(~loss_mask, 0.0).sum(1)
        return seq_sum, seq_sum / loss_mask.sum(1).clamp(min=1)

    return run


CONTENDERS: dict[str, Contender] = {
    contender.name: contender
    for contender in (
        Contender(
            "eager",
            "lenalign.reference: fp32 log_softmax + gather + masked sum and mean (TRL <= 1.13)",
            _eager,
        ),
        Contender("compile", "torch.compile of the eager reference, default settings", _compiled),
        Contender(
            "lenalign-torch",
            "sequence_logprobs(backend='torch'): chunked PyTorch, counted rows only",
            _lenalign("torch", inplace_backward=False),
        ),
        Contender(
            "lenalign-torch-inplace",
            "the torch backend with inplace_backward=True (gradient written over the logits)",
            _lenalign("torch", inplace_backward=True),
            modes=(FORWARD_BACKWARD,),
            overwrites_logits=True,
        ),
        Contender(
            "lenalign-triton",
            "sequence_logprobs(backend='triton'): the fused Triton kernels",
            _lenalign("triton", inplace_backward=False),
            unavailable=_triton_unavailable,
        ),
        Contender(
            "lenalign-triton-inplace",
            "the Triton kernels with inplace_backward=True",
            _lenalign("triton", inplace_backward=True),
            unavailable=_triton_unavailable,
            modes=(FORWARD_BACKWARD,),
            overwrites_logits=True,
        ),
        Contender(
            "liger",
            "liger-kernel cross entropy, reduction='none', then the masked sum and mean",
            _liger,
            unavailable=_liger_unavailable,
            # Liger writes the gradient into its input during the forward
            overwrites_logits=True,
        ),
        Contender(
            "trl",
            "trl.trainer.utils.selective_log_softmax on the shifted logits, masked sum and "
            "mean (from trl 1.14 on CUDA it runs TRL's own fused Triton kernel)",
            _trl,
            unavailable=_trl_unavailable,
        ),
    )
}


def load_extra_contender(spec: str) -> Contender:
    """Import ``module:attribute`` naming a :class:`Contender` (a hook for testing the harness)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        fail("--extra-contender", "MODULE:ATTRIBUTE", repr(spec))
    contender = getattr(importlib.import_module(module_name), attribute)
    if not isinstance(contender, Contender):
        fail("--extra-contender", "a Contender", f"{spec}, a {type(contender).__name__}")
    return contender
