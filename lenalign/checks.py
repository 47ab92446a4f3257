"""The one family of argument checks that every part of lenalign uses.

Every failure is a ValueError of one form, ``"<argument>: expected <what>, got <what
came>"``, so that a user reads which argument was wrong and what it should have been,
whichever wing raised it. ``bool`` is refused wherever a number is expected: it is an
``int`` subclass, and ``True`` as a count or a scale is a slip, not a 1.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import NoReturn

import torch
from torch.autograd import forward_ad


def fail(argument: str, expected: str, got: object) -> NoReturn:
    """Raise the package's ValueError for ``argument``."""
    raise ValueError(f"{argument}: expected {expected}, got {got}")


def check_tensor(argument: str, value: object) -> torch.Tensor:
    """``value`` itself if it is a tensor."""
    if not isinstance(value, torch.Tensor):
        fail(argument, "a torch.Tensor", type(value).__name__)
    return value


def is_dtensor(value: object) -> bool:
    """Whether ``value`` is a torch.distributed DTensor (importing DTensor only if it can be)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def check_local(argument: str, value: torch.Tensor, hint: str) -> torch.Tensor:
    """``value`` itself unless it is a DTensor, which the caller must not pass (``hint``)."""
    if is_dtensor(value):
        fail(argument, f"a torch.Tensor, not a DTensor ({hint})", f"placements {value.placements}")
    return value


def check_bool(argument: str, value: object) -> bool:
    """``value`` itself if it is a bool (not merely truthy)."""
    if not isinstance(value, bool):
        fail(argument, "a bool", type(value).__name__)
    return value


def check_int(argument: str, value: object, minimum: int | None = None) -> int:
    """``value`` itself if it is an int (not a bool), at least ``minimum`` when given."""
    if isinstance(value, bool) or not isinstance(value, int):
        fail(argument, "an integer", repr(value))
    if minimum is not None and value < minimum:
        fail(argument, f"an integer >= {minimum}", value)
    return value


def finite_real(argument: str, value: object) -> float:
    """``value`` as a float if it is a finite real number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        fail(argument, "a real number", type(value).__name__)
    number = float(value)
    if not math.isfinite(number):
        fail(argument, "a finite number", number)
    return number


def positive_finite(argument: str, value: object) -> float:
    """``value`` as a float if it is a finite number > 0 (not a bool)."""
    is_number = isinstance(value, Real) and not isinstance(value, bool)
    if not (is_number and math.isfinite(value) and value > 0):
        fail(argument, "a finite number > 0", repr(value))
    return float(value)


def check_choice(argument: str, value: object, choices: tuple) -> object:
    """``value`` itself if it is one of ``choices``."""
    if value not in choices:
        fail(argument, f"one of {choices}", repr(value))
    return value


def refuse_forward_ad(entry: str, **tensors: object) -> None:
    """Raise NotImplementedError if one of ``tensors`` carries a forward-mode tangent.

    lenalign's operators define a backward only; under ``torch.autograd.forward_ad`` their
    outputs would come back with no tangent, which reads as a zero derivative. (A
    ``torch.func.jvp`` transform raises by itself.) Outside a dual level nothing can carry
    a tangent, and the check costs one read of a global, which torch.compile guards on.
    """
    if forward_ad._current_level >= 0:
        _refuse_tangents(entry, tensors)


@torch.compiler.disable  # unpack_dual is not traceable: a compiled caller runs this eagerly
def _refuse_tangents(entry: str, tensors: dict[str, object]) -> None:
    for argument, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            continue  # the argument checks name it
        if forward_ad.unpack_dual(tensor).tangent is not None:
            raise NotImplementedError(
                f"lenalign.{entry}: {argument} carries a forward-mode tangent "
                "(torch.autograd.forward_ad), and lenalign has no forward-mode derivative; "
                "use reverse mode (backward(), torch.autograd.grad, torch.func.grad or vjp)"
            )
