"""The contenders of benchmarks/linear_head.py: label log-probabilities from hidden states.

Every contender gets the same causal batch and answers the same question, each the way
its users call it:

    hidden  [B, T, H]  the states entering the LM head (float32, bfloat16 or float16)
    weight  [V, H]     the head's weight, the hidden states' dtype and device
    labels  [B, T]     int64 token ids in [0, V)
    mask    [B, T]     bool, True where a label counts (a completion token)

    -> tokens [B, T - 1]  log p(labels[:, t + 1] | hidden[:, t]), 0 where not counted
       sum    [B]         the counted tokens' sum per sequence
       mean   [B]         sum / count (count = mask[:, 1:].sum(1), at least 1)

all float32 (float64 for float64 inputs), differentiable in ``hidden`` and ``weight``.
A third-party contender imports its package only when it runs and, where the package is
missing or cannot run on the device, says why instead of disappearing.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lenalign import linear_sequence_logprobs, reference_sequence_logprobs

Output = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Run = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], Output]

# the label value the cross-entropy contenders are told to ignore (their default)
IGNORE_INDEX = -100
# TRL 1.16's fused head (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE): vocabulary
# columns per tile
TRL_VOCAB_CHUNK = 32768
# distributions whose versions every report records: what runs depends on them
DISTRIBUTIONS = ("trl", "liger-kernel", "cut-cross-entropy")


def installed_versions() -> dict[str, str | None]:
    """The version of each of DISTRIBUTIONS, None where it is not installed."""
    versions = {}
    for distribution in DISTRIBUTIONS:
        try:
            versions[distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[distribution] = None
    return versions


@dataclass(frozen=True)
class HeadContender:
    """One implementation of the head's label log-probabilities.

    Attributes:
        name: the name on the command line and in the table.
        summary: one line saying what runs.
        run: ``run(hidden, weight, labels, mask) -> (tokens, sum, mean)`` as the module says.
        unavailable: given the device, why the contender cannot run there, or None.
        gpu_kernel: its kernels are written for a GPU; on CPU they can only run in Triton's
            interpreter, so an error there makes the contender skipped (with the error as
            the reason), not failed. On a GPU every error is a failure.
    """

    name: str
    summary: str
    run: Run
    unavailable: Callable[[torch.device], str | None] = lambda device: None
    gpu_kernel: bool = False


def from_tokens(tokens: torch.Tensor, mask: torch.Tensor) -> Output:
    """(tokens, sum, mean) from tokens [B, T - 1] that are 0 where not counted."""
    # a 16-bit sum would round: accumulate in float32 (float64 stays float64)
    tokens = tokens.to(torch.promote_types(tokens.dtype, torch.float32))
    seq_sum = tokens.sum(1)
    return tokens, seq_sum, seq_sum / mask[:, 1:].sum(1).clamp(min=1)


def eager(hidden, weight, labels, mask) -> Output:
    """What a trainer does: the full [B, T, V] logits, then lenalign.reference's fp32
    log_softmax, gather and masked sums (TRL <= 1.13's recipe)."""
    out = reference_sequence_logprobs(
        torch.nn.functional.linear(hidden, weight), labels, mask, shift=True
    )
    return out.token_logprobs[:, 1:], out.sum, out.mean


@functools.cache
def _compiled(backend: str) -> Run:
    compiled = torch.compile(eager, backend=backend)

    def run(*inputs: torch.Tensor) -> Output:
        # Past the recompile limit dynamo would quietly run the eager code under the
        # compile name; make that an error (and so a failure) instead, for these calls
        # only: the setting is process-wide, and lenalign's torch backend compiles too.
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            return compiled(*inputs)

    return run


def compile_contender(backend: str = "inductor") -> HeadContender:
    """torch.compile of eager with ``backend``: "inductor" (the default) measures what users
    get; "aot_eager" traces the same graphs (dynamo, AOTAutograd) without inductor's code
    generation, which takes 16 s on a cold 2-core CPU: the --dry run's plumbing check."""
    summary = "torch.compile of eager, default settings"
    if backend != "inductor":
        summary = f"torch.compile(backend={backend!r}) of eager: traced, not code-generated"
    return HeadContender("compile", summary, lambda *inputs: _compiled(backend)(*inputs))


def lenalign_head(hidden, weight, labels, mask) -> Output:
    """linear_sequence_logprobs: the head applied to the counted rows only, a chunk at a
    time (the Triton kernels on a GPU, the PyTorch backend on CPU)."""
    out = linear_sequence_logprobs(
        hidden, weight, labels, mask, shift=True, return_token_logprobs=True
    )
    return out.token_logprobs[:, 1:], out.sum, out.mean


def _missing(module: str, distribution: str, version: str) -> str | None:
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return f"{distribution} is not installed (pip install {distribution}=={version})"
    try:
        importlib.import_module(module)
    except Exception as error:  # any import-time failure makes the contender unusable
        return f"importing {module} failed: {type(error).__name__}: {error}"
    return None


def _triton_on_cpu(device: torch.device, what: str) -> str | None:
    """Why a Triton-kernel contender cannot even be tried on ``device``, or None."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return (
            f"{what} runs Triton kernels written for a GPU; on CPU only Triton's interpreter "
            "could run them, and TRITON_INTERPRET=1 was not set before triton was imported"
        )
    return None


def trl_unavailable(device: torch.device) -> str | None:
    # the function's backward imports trl.trainer.utils: a dependency missing there
    # (datasets, for one) would otherwise fail the first backward instead of skipping
    reason = _missing("trl.trainer.utils", "trl", "1.16.0")
    if reason is None and not hasattr(
        importlib.import_module("trl.kernels"), "ChunkedLogProbFunction"
    ):
        reason = "this trl has no trl.kernels.ChunkedLogProbFunction (trl 1.16 has it)"
    return reason


def trl_fused_head(hidden, weight, labels, mask) -> Output:
    """As trl 1.16's add_fused_lm_head (DPOTrainer's fused_lm_head=True) calls it."""
    from trl.kernels import ChunkedLogProbFunction

    counted = mask[:, 1:]  # hidden state t scores label t + 1
    targets = labels[:, 1:]
    # TRL projects only the counted rows where its Triton kernel runs (CUDA, XPU) and every
    # row elsewhere, to keep tile shapes fixed (trl.trainer.utils: compact = _use_triton)
    compact = hidden.device.type in ("cuda", "xpu")
    rows = hidden[:, :-1][counted] if compact else hidden[:, :-1].reshape(-1, hidden.shape[-1])
    ids = targets[counted] if compact else torch.where(counted, targets, 0).reshape(-1)
    # (hidden, weight, bias, targets, temperature, chunk, softcap, logit_scale, outputs)
    log_probs = ChunkedLogProbFunction.apply(
        rows, weight, None, ids, 1.0, TRL_VOCAB_CHUNK, None, 1.0, ("log_probs",)
    )[0]
    if compact:
        tokens = log_probs.new_zeros(counted.shape).masked_scatter(counted, log_probs)
    else:
        tokens = log_probs.view(counted.shape).masked_fill(~counted, 0)
    return from_tokens(tokens, mask)


def liger_unavailable(device: torch.device) -> str | None:
    reason = _missing("liger_kernel.transformers.functional", "liger-kernel", "0.8.5")
    return reason or _triton_on_cpu(device, "liger-kernel's fused linear cross entropy")


def liger_flce(hidden, weight, labels, mask) -> Output:
    """Liger's fused linear cross entropy, reduction="none": log-prob = -loss per token."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    batch, steps, features = hidden.shape
    # Row t of [B * T, H] scores the label at t + 1: shifting the labels (the last row of
    # each sequence ignored) keeps the hidden states a view, as transformers' shift_labels
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = torch.where(mask[:, 1:], labels[:, 1:], IGNORE_INDEX)
    loss = liger_fused_linear_cross_entropy(
        hidden.reshape(-1, features),
        weight,
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return from_tokens(-loss.view(batch, steps)[:, :-1], mask)


def cce_unavailable(device: torch.device) -> str | None:
    reason = _missing("cut_cross_entropy", "cut-cross-entropy", "25.1.1")
    return reason or _triton_on_cpu(device, "cut-cross-entropy's linear_cross_entropy")


def cce(hidden, weight, labels, mask) -> Output:
    """cut-cross-entropy's linear_cross_entropy, reduction="none", shift=True, its default
    implementation ("cce") and gradient filter (filter_eps="high")."""
    from cut_cross_entropy import linear_cross_entropy

    targets = torch.where(mask, labels, IGNORE_INDEX)
    # with shift=True it scores targets[:, 1:] from hidden[:, :-1] and returns [B, T - 1],
    # 0 where ignored
    loss = linear_cross_entropy(
        hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="none", shift=True
    )
    return from_tokens(-loss, mask)


# eager first: it is the yardstick the others' errors are set against
CONTENDERS: dict[str, HeadContender] = {
    c.name: c
    for c in (
        HeadContender(
            "eager", "F.linear to the full logits, lenalign.reference's fp32 log_softmax", eager
        ),
        compile_contender(),
        HeadContender(
            "lenalign",
            "linear_sequence_logprobs(backend='auto'): counted rows, a chunk at a time",
            lenalign_head,
        ),
        HeadContender(
            "trl-fused-head",
            "trl.kernels.ChunkedLogProbFunction as trl 1.16's DPOTrainer calls it",
            trl_fused_head,
            trl_unavailable,
        ),
        HeadContender(
            "liger-flce",
            "liger_fused_linear_cross_entropy, reduction='none', -loss per token",
            liger_flce,
            liger_unavailable,
            gpu_kernel=True,
        ),
        HeadContender(
            "cce",
            "cut_cross_entropy.linear_cross_entropy, reduction='none', shift=True",
            cce,
            cce_unavailable,
            gpu_kernel=True,
        ),
    )
}
