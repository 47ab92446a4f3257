"""pytest-benchmark timings of every contender, checked against eager before being timed.

A contender that cannot run here is skipped with the reason; one whose sum, mean or
gradient is off the eager reference fails instead of being timed. Peak memory above the
inputs and the check ratios go into each benchmark's ``extra_info``.
"""

from __future__ import annotations

import pytest

from lenalign.bench import CONTENDERS, DEFAULT_REPEATS, MODES, check, make_step, synchronize

PAIRS = [
    pytest.param(name, mode, id=f"{mode}-{name}")
    for mode in MODES
    for name, contender in CONTENDERS.items()
    if mode in contender.modes
]


@pytest.mark.parametrize(("name", "mode"), PAIRS)
def test_sequence_logprobs(benchmark, request, case, name: str, mode: str) -> None:
    contender = CONTENDERS[name]
    workload = case.workload
    device = workload.logits.device
    reason = contender.unavailable(device)
    if reason is not None:
        pytest.skip(reason)
    if contender.overwrites_logits:
        workload.keep_pristine()
        request.addfinalizer(workload.restore)
    step = make_step(contender.build(workload), mode, workload)

    ratios, wrong = check(step(), case.reference, workload.logits.dtype)
    if wrong is not None:
        pytest.fail(f"{name} ({mode}): {wrong}")
    peak = None
    if case.probe.reason is None:
        case.probe.start()
        step()
        peak = case.probe.stop()

    def call() -> None:
        # the outputs are dropped before the next round, as in lenalign bench, so two
        # gradients are never alive at once
        step()
        synchronize(device)

    benchmark.extra_info.update(
        case=case.spec.label,
        mode=mode,
        contender=name,
        counted_rows=workload.counted_rows,
        logits_bytes=workload.logits.numel() * workload.logits.element_size(),
        peak_bytes_above_inputs=peak,
        check_ratios=ratios,
    )
    benchmark.pedantic(call, rounds=DEFAULT_REPEATS[device.type], iterations=1, warmup_rounds=0)
