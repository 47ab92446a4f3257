"""What the registered operators hold and accept: saved tensors, overlapping storage,
meta tensors, torch.func, forward-mode AD and devices without float64."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from helpers import BACKENDS, DEVICE, random_problem
from torch.utils._python_dispatch import TorchDispatchMode

import lenalign.function
from lenalign import (
    linear_sequence_logprobs,
    reference_sequence_logprobs,
    sequence_logprobs,
    torch_backend,
)


def _head_problem(seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 7, 5, generator=generator, dtype=torch.float64)
    weight = torch.randn(9, 5, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 9, (3, 7), generator=generator)
    labels[:, :3] = -100
    return hidden.to(DEVICE), weight.to(DEVICE), labels.to(DEVICE)


def _linear_loss(hidden, weight, labels, backend):
    out = linear_sequence_logprobs(hidden, weight, labels, shift=True, backend=backend)
    return (out.sum * torch.arange(1.0, 4.0, dtype=torch.float64, device=DEVICE)).sum()


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_forward_does_not_keep_the_hidden_states_alive(backend):
    hidden, weight, labels = _head_problem()
    leaf = hidden.clone().requires_grad_()
    (want,) = torch.autograd.grad(_linear_loss(leaf, weight, labels, backend), leaf)
    leaf = hidden.clone().requires_grad_()
    scaled = leaf.clone()  # as a model's last hidden states: a non-leaf
    alive = weakref.ref(scaled)
    loss = _linear_loss(scaled, weight, labels, backend)
    del scaled
    gc.collect()
    assert alive() is None, "the [B, T, H] hidden states outlived the forward"
    loss.backward()
    torch.testing.assert_close(leaf.grad, want, rtol=1e-12, atol=1e-12)


class _Offload:
    """saved_tensors_hooks that move every saved tensor to a private copy."""

    def __init__(self):
        self.packed = 0

    def pack(self, tensor):
        self.packed += 1
        return tensor.detach().clone()

    def unpack(self, copy):
        return copy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_saved_tensors_hooks_see_every_saved_tensor(path, backend):
    """With every saved tensor replaced by a copy, nothing else holds the input: if a
    tensor escaped the hooks, the input would stay alive (or the gradient be wrong)."""
    if path == "logits":
        logits, labels, mask = random_problem(2, 5, 7, seed=3)

        def loss_of(rows):
            out = sequence_logprobs(rows, labels, mask, backend=backend)
            weights = torch.tensor([1.0, -3.0], dtype=torch.float64, device=DEVICE)
            return (out.mean * weights).sum()

        rows = logits
    else:
        rows, weight, labels = _head_problem(4)

        def loss_of(rows):
            return _linear_loss(rows, weight, labels, backend)

    leaf = rows.clone().requires_grad_()
    (want,) = torch.autograd.grad(loss_of(leaf), leaf)
    leaf = rows.clone().requires_grad_()
    offload = _Offload()
    scaled = leaf.clone()
    alive = weakref.ref(scaled)
    with torch.autograd.graph.saved_tensors_hooks(offload.pack, offload.unpack):
        loss = loss_of(scaled)
    del scaled
    gc.collect()
    assert offload.packed > 0
    assert alive() is None, "a saved tensor escaped saved_tensors_hooks"
    loss.backward()
    torch.testing.assert_close(leaf.grad, want, rtol=1e-12, atol=1e-12)


def _overlapping_logits(kind: str) -> torch.Tensor:
    """4 x 13 x 6 logits whose elements share memory, on the tests' device (moved before
    the overlapping view is taken: moving the view would copy it apart)."""
    generator = torch.Generator().manual_seed(5)
    if kind == "expanded over the batch":
        base = torch.randn(1, 13, 6, generator=generator, dtype=torch.float64).to(DEVICE)
        return base.expand(4, 13, 6)
    if kind == "expanded over time":
        base = torch.randn(4, 1, 6, generator=generator, dtype=torch.float64).to(DEVICE)
        return base.expand(4, 13, 6)
    # a sliding window: row t starts 2 elements after row t - 1 and overlaps it
    flat = torch.randn(4 * 40, generator=generator, dtype=torch.float64).to(DEVICE)
    return flat.as_strided((4, 13, 6), (40, 2, 1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kind", ["expanded over the batch", "expanded over time", "as_strided window"]
)
def test_inplace_backward_refuses_logits_that_overlap_themselves(kind, backend):
    generator = torch.Generator().manual_seed(6)
    labels = torch.randint(0, 6, (4, 13), generator=generator).to(DEVICE)
    source = _overlapping_logits(kind)
    logits = source.detach().requires_grad_()  # a leaf that keeps the overlapping strides
    assert logits.stride() == source.stride()
    with pytest.raises(ValueError, match=r"^inplace_backward: expected logits whose elements"):
        sequence_logprobs(logits, labels, inplace_backward=True, backend=backend)
    # without it the gradient is exact against the eager reference
    (got,) = torch.autograd.grad(
        sequence_logprobs(logits, labels, backend=backend).sum.sum(), logits
    )
    ref = source.detach().contiguous().requires_grad_()
    (want,) = torch.autograd.grad(reference_sequence_logprobs(ref, labels).sum.sum(), ref)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_still_takes_strided_views_that_do_not_overlap(backend):
    logits, labels, _ = random_problem(2, 6, 9, seed=8)
    ref = logits[:, :-1].clone().requires_grad_()
    (want,) = torch.autograd.grad(reference_sequence_logprobs(ref, labels[:, 1:]).sum.sum(), ref)
    leaf = logits.clone().requires_grad_()
    view = (leaf * 1.0)[:, :-1]  # rows strided by V, one row per sequence skipped
    out = sequence_logprobs(view, labels[:, 1:], inplace_backward=True, backend=backend)
    out.sum.sum().backward()
    torch.testing.assert_close(leaf.grad[:, :-1], want, rtol=1e-12, atol=1e-12)
    assert not leaf.grad[:, -1].any()


@pytest.mark.parametrize("shift", [False, True])
def test_meta_tensors_flow_through_with_the_right_shapes(shift):
    logits = torch.empty(3, 8, 50, device="meta", dtype=torch.bfloat16)
    labels = torch.empty(3, 8, device="meta", dtype=torch.int64)
    out = sequence_logprobs(
        logits, labels, shift=shift, return_token_logprobs=True, return_token_stats=True
    )
    assert [t.device.type for t in (*out[:4], *out.token_stats)] == ["meta"] * 8
    assert all(t.shape == (3, 8) for t in out.token_stats)
    assert out.token_stats.is_top1.dtype == torch.bool
    assert out.sum.shape == out.mean.shape == out.count.shape == (3,)
    assert out.token_logprobs.shape == (3, 8)
    assert out.sum.dtype == out.token_logprobs.dtype == torch.float32
    assert out.count.dtype == torch.int64
    hidden = torch.empty(16, 4, device="meta", dtype=torch.float64, requires_grad=True)
    weight = torch.empty(50, 4, device="meta", dtype=torch.float64, requires_grad=True)
    packed = linear_sequence_logprobs(
        hidden,
        weight,
        torch.empty(16, device="meta", dtype=torch.int64),
        cu_seqlens=torch.empty(4, device="meta", dtype=torch.int64),
        shift=shift,
    )
    assert packed.sum.shape == (3,) and packed.sum.dtype == torch.float64
    packed.sum.sum().backward()
    assert hidden.grad.shape == hidden.shape and hidden.grad.device.type == "meta"
    assert weight.grad.shape == weight.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_grad(backend):
    logits, labels, mask = random_problem(2, 5, 7, seed=9)

    def mean_of_means(rows):
        return sequence_logprobs(rows, labels, mask, shift=True, backend=backend).mean.sum()

    leaf = logits.clone().requires_grad_()
    (want,) = torch.autograd.grad(mean_of_means(leaf), leaf)
    torch.testing.assert_close(torch.func.grad(mean_of_means)(logits), want, rtol=0, atol=0)
    hidden, weight, head_labels = _head_problem(10)
    grads = torch.func.grad(lambda h, w: _linear_loss(h, w, head_labels, backend), (0, 1))(
        hidden, weight
    )
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    want = torch.autograd.grad(_linear_loss(*leaves, head_labels, backend), leaves)
    torch.testing.assert_close(grads, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_ad_raises_naming_lenalign_instead_of_a_missing_tangent(backend):
    # the operators have no forward-mode derivative; their outputs used to come back
    # without a tangent, which reads as a zero derivative where the true one is not zero
    logits, labels, mask = random_problem(2, 5, 7, seed=11)
    hidden, weight, head_labels = _head_problem(12)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(logits, torch.randn_like(logits))
        with pytest.raises(NotImplementedError, match=r"lenalign\.sequence_logprobs: logits"):
            sequence_logprobs(dual, labels, mask, shift=True, backend=backend)
        for argument in ("hidden", "weight"):
            primals = {"hidden": hidden, "weight": weight}
            primals[argument] = torch.autograd.forward_ad.make_dual(
                primals[argument], torch.randn_like(primals[argument])
            )
            with pytest.raises(
                NotImplementedError, match=rf"lenalign\.linear_sequence_logprobs: {argument}"
            ):
                linear_sequence_logprobs(**primals, labels=head_labels, backend=backend)
        # plain tensors inside a dual level are no forward-mode use: they go through
        out = sequence_logprobs(logits, labels, mask, shift=True, backend=backend)
        assert torch.autograd.forward_ad.unpack_dual(out.sum).tangent is None
        # nor does a compiled caller hide the tangent
        compiled = torch.compile(
            lambda rows: sequence_logprobs(rows, labels, mask, backend=backend).sum,
            backend="eager",
        )
        with pytest.raises(NotImplementedError, match=r"lenalign\.sequence_logprobs: logits"):
            compiled(dual)
    # a jvp transform raises by itself
    with pytest.raises(NotImplementedError):
        torch.func.jvp(
            lambda rows: sequence_logprobs(rows, labels, mask, backend=backend).sum,
            (logits,),
            (torch.randn_like(logits),),
        )


class _Float64Watch(TorchDispatchMode):
    """Records whether any operator produced, or was asked for, a float64 tensor. A
    dispatch mode sees the public call and its backward, and a lenalign operator as one
    call; what runs inside one is watched by calling the backend's functions directly."""

    def __init__(self):
        super().__init__()
        self.seen = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        values = [*args, *kwargs.values(), result]
        values += list(result) if isinstance(result, (tuple, list)) else []
        self.seen |= kwargs.get("dtype") == torch.float64 or any(
            isinstance(v, torch.Tensor) and v.dtype == torch.float64 for v in values
        )
        return result


def _float32_forward_backward(logits, labels):
    out = sequence_logprobs(logits, labels, backend="torch", return_token_logprobs=True)
    torch.autograd.grad(out.sum.sum() + out.mean.sum() + out.token_logprobs.sum(), logits)
    # the bodies of the operators: the torch backend's row and segment functions
    rows = logits.detach()
    targets = labels.reshape(-1).clamp(min=0)
    bounds = torch.tensor([0, labels.shape[1], labels.numel()], device=labels.device)
    logprob, row_max, log_sum = torch_backend.row_logprob_forward(rows, targets, torch.float32)
    torch_backend.segment_reduce(logprob, targets, bounds)
    coef = torch.ones_like(log_sum)
    torch_backend.row_logprob_backward(rows, targets, row_max, log_sum, coef, rows.clone())


def test_no_float64_where_the_device_has_none(monkeypatch):
    logits, labels, _ = random_problem(2, 5, 7, dtype=torch.float32, seed=11)
    logits.requires_grad_()
    # the watch sees the float64 fold on a device that has float64 ...
    watch = _Float64Watch()
    with watch:
        _float32_forward_backward(logits, labels)
    assert watch.seen
    # ... and nothing float64 once the device is one without it, as MPS is
    monkeypatch.setattr(lenalign.function, "NO_FLOAT64_DEVICE_TYPES", (DEVICE.type,))
    watch = _Float64Watch()
    with watch:
        _float32_forward_backward(logits, labels)
    assert not watch.seen
