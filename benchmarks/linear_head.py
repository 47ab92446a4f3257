"""From hidden states: eager PyTorch against ``linear_sequence_logprobs``, forward + backward.

    python benchmarks/linear_head.py                      # CPU: 4 x 512 tokens, H = 256
    python benchmarks/linear_head.py --shape 8x2048x4096x128256 --dtype bfloat16   # GPU

Eager is what a trainer does with a model's head: ``F.linear`` to the full [B, T, V]
logits, then the fp32 log_softmax, gather and masked sums of lenalign.reference.
lenalign projects only the counted rows, a chunk at a time; so does TRL's fused LM head
(``trl-fused-head``: trl.kernels.ChunkedLogProbFunction as trl 1.16's DPOTrainer calls
it), run where trl is installed and reported as skipped, with the reason, where not.
All get the same hidden states, head weight and labels (about half of the positions
counted, shift=True) and differentiate the sequence means into the hidden states and the
weight; every contender is checked against eager before anything is timed. Reports the
median time and the peak memory above the inputs (host resident memory on CPU,
PyTorch's allocator on a GPU), with the ratios to eager.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import torch

from lenalign import linear_sequence_logprobs, reference_sequence_logprobs
from lenalign.bench import Clock, machine_description, peak_memory_probe, shape_parser

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SHAPES = {"cpu": ["4x512x256x32000", "4x512x256x128256"], "cuda": ["8x2048x4096x128256"]}


parse_shape = shape_parser("BxTxHxV", "8x2048x4096x128256")


def make_inputs(shape, dtype, device):
    batch, steps, features, vocab = shape
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, steps, features, generator=generator).to(device, dtype)
    weight = (torch.randn(vocab, features, generator=generator) / features**0.5).to(device, dtype)
    labels = torch.randint(0, vocab, (batch, steps), generator=generator).to(device)
    # completions: the second half of each row, give or take, as in a preference batch
    starts = torch.randint(steps // 3, 2 * steps // 3, (batch, 1), generator=generator)
    mask = (torch.arange(steps)[None, :] >= starts).to(device)
    return hidden, weight, labels, mask


def eager_step(hidden, weight, labels, mask):
    logits = torch.nn.functional.linear(hidden, weight)
    return reference_sequence_logprobs(logits, labels, mask, shift=True).mean


def lenalign_step(hidden, weight, labels, mask):
    return linear_sequence_logprobs(hidden, weight, labels, mask, shift=True).mean


# trl >= 1.16's DPOTrainer (add_fused_lm_head) scores the counted positions' hidden states
# through trl.kernels.ChunkedLogProbFunction, 32768 vocabulary columns per tile
TRL_VOCAB_CHUNK = 32768


def trl_unavailable() -> str | None:
    try:
        # trl.trainer.utils is imported by the function's forward: a dependency missing
        # there would otherwise fail the first call instead of skipping the contender
        import trl.trainer.utils  # noqa: F401
        from trl.kernels import ChunkedLogProbFunction  # noqa: F401
    except ImportError as error:
        return f"trl.kernels.ChunkedLogProbFunction cannot run ({error}); trl 1.16 has it"
    return None


def trl_step(hidden, weight, labels, mask):
    from trl.kernels import ChunkedLogProbFunction

    # TRL's own layout: hidden state t scores label t + 1, only where that label counts
    counted = mask[:, 1:]
    log_probs = ChunkedLogProbFunction.apply(
        hidden[:, :-1][counted], weight, None, labels[:, 1:][counted],
        1.0, TRL_VOCAB_CHUNK, None, 1.0, ("log_probs",),
    )[0]  # fmt: skip
    per_token = log_probs.new_zeros(counted.shape).masked_scatter(counted, log_probs)
    return per_token.float().sum(1) / counted.sum(1).clamp(min=1)


# name -> (step, why it cannot run here or None)
CONTENDERS: dict[str, tuple[Callable, Callable[[], str | None]]] = {
    "lenalign": (lenalign_step, lambda: None),
    "trl-fused-head": (trl_step, trl_unavailable),
}


def run_step(step: Callable, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden, weight, labels, mask = inputs
    hidden = hidden.detach().requires_grad_(True)
    weight = weight.detach().requires_grad_(True)
    mean = step(hidden, weight, labels, mask)
    mean.sum().backward()
    return mean.detach(), hidden.grad, weight.grad


def worst_relative(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = float(want.abs().max()) or 1.0
    return float((got.double() - want.double()).abs().max()) / scale


def main(argv: list[str] | None = None) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=parse_shape, action="append", metavar="BxTxHxV")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be positive, got {args.repeats}")
    shapes = args.shape or [parse_shape(s) for s in DEFAULT_SHAPES[device.type]]
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    # one rounding of each relative error: dtype's epsilon, a few times over for sums
    tolerance = 16 * torch.finfo(dtype).eps
    clock = Clock(device)
    probe = peak_memory_probe(device)
    machine = machine_description(device)
    print(f"{machine['name']}; torch {machine['torch']}; {dtype}")
    print("| B x T x H x V | contender | median time | vs eager | peak above inputs | vs eager |")
    print("| --- | --- | --- | --- | --- | --- |")
    failed = False
    for shape in shapes:
        label = "x".join(map(str, shape))
        inputs = make_inputs(shape, dtype, device)
        want = run_step(eager_step, inputs)
        steps = {"eager": eager_step}
        for name, (step, unavailable) in CONTENDERS.items():
            reason = unavailable()
            if reason is not None:
                print(f"| {label} | {name} | skipped: {reason} | | | |")
                continue
            # checked against eager before it is timed: a wrong result gets no time
            errors = [
                worst_relative(g, w) for g, w in zip(run_step(step, inputs), want, strict=True)
            ]
            if max(errors) > tolerance:
                failed = True
                print(f"| {label} | {name} | FAILED: relative errors {errors} over {tolerance} | |")
                continue
            steps[name] = step
        figures = {}
        for name, step in steps.items():
            probe.start()
            run_step(step, inputs)
            peak = probe.stop()
            seconds = statistics.median(
                clock.time(lambda step=step, inputs=inputs: run_step(step, inputs))
                for _ in range(args.repeats)
            )
            figures[name] = (seconds, peak)
        base_seconds, base_peak = figures["eager"]
        for name, (seconds, peak) in figures.items():
            print(
                f"| {label} | {name} | {seconds * 1e3:.0f} ms | {seconds / base_seconds:.2f}x | "
                f"{peak / 2**20:.0f} MiB | {peak / max(base_peak, 1):.2f}x |"
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
