"""Running a computation as a forward of the FSDP2 unit that owns some parameters.

``fully_shard`` keeps a module's parameters as sharded DTensors except while the module
runs a forward: its pre-forward hook all-gathers them, its post-forward hook reshards
them (the root excepted) and hooks the outputs, so that backward all-gathers them again
before the gradients flow through, and reduce-scatters their gradients afterwards.
Work that reads the parameters outside ``forward`` (here: the fused LM head, which reads
``lm_head.weight`` in its forward and again in its backward) must run as a forward too.
``torch.distributed.fsdp.register_fsdp_forward_method`` is the public way to declare
one; ``run_as_forward`` registers a generic method once per unit and calls a function
through it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from ..checks import fail

Result = TypeVar("Result")

# the attribute run_as_forward registers on an FSDP unit; a name no model defines
FORWARD_METHOD = "lenalign_run_as_forward"

# The units a run_as_forward call is inside, per thread. Entering a unit's hooks again
# from within its own forward would run its post-forward (reshard, hook the outputs,
# end the root's iteration) in the middle of the outer call; inside, the parameters are
# already unsharded, so the nested call runs the function directly instead.
_running = threading.local()


def _call(function: Callable[..., Result], *args: Any, **kwargs: Any) -> Result:
    """The registered method: FSDP's hooks run around it, it only calls ``function``."""
    return function(*args, **kwargs)


def _running_units() -> set[int]:
    if not hasattr(_running, "units"):
        _running.units = set()
    return _running.units


def run_as_forward(
    module: nn.Module, function: Callable[..., Result], *args: Any, **kwargs: Any
) -> Result:
    """``function(*args, **kwargs)`` as a forward of ``module``.

    For an ``FSDPModule`` (a module that ``fully_shard`` was applied to) the call goes
    through a method registered with ``register_fsdp_forward_method`` (once per module):
    the module's parameters are unsharded while ``function`` runs, its outputs carry
    FSDP's pre-backward hooks (the parameters are unsharded again for the backward) and
    the gradients of those parameters are reduce-scattered after it. Tensors among
    ``args`` and ``kwargs`` get what a forward's inputs get (moved to the device, cast
    under a ``MixedPrecisionPolicy``, hooked for the post-backward): pass the tensors
    ``function`` differentiates through as arguments, not in a closure. For any other
    module, or from inside a ``run_as_forward`` of the same module, ``function`` is
    simply called.

    Args:
        module: the FSDP unit whose parameters ``function`` reads, or any module.
        function: what to run; it should read the parameters from the module's
            attributes while it runs (``head.weight``), not receive tensors read before.

    Returns:
        What ``function`` returns (a tensor, or tuples, NamedTuples, dicts of them).
    """
    if not isinstance(module, FSDPModule) or id(module) in _running_units():
        return function(*args, **kwargs)
    if FORWARD_METHOD not in vars(module):
        # register_fsdp_forward_method patches an existing attribute; a plain function
        # stored on the instance is called unbound, with the arguments as given
        setattr(module, FORWARD_METHOD, _call)
        register_fsdp_forward_method(module, FORWARD_METHOD)
    units = _running_units()
    units.add(id(module))
    try:
        return getattr(module, FORWARD_METHOD)(function, *args, **kwargs)
    finally:
        units.discard(id(module))


def owning_unit(model: nn.Module, module: nn.Module) -> nn.Module | None:
    """The FSDP unit of ``model`` that shards ``module``'s parameters, or None.

    ``fully_shard`` applied to a module manages every parameter below it that no
    ``fully_shard`` further down manages: the unit is ``module`` itself or its nearest
    ancestor that is an ``FSDPModule``. None when there is none inside ``model``
    (unsharded, or sharded by a unit that wraps ``model``, whose forward is then the
    caller's to run).

    Raises:
        ValueError: ``module`` is not a submodule of ``model``.
    """
    path = next((name for name, sub in model.named_modules() if sub is module), None)
    if path is None:
        fail("model", f"a model containing its {type(module).__name__} head", "a model without it")
    parts = path.split(".") if path else []
    # from the module itself up to the model
    for depth in range(len(parts), -1, -1):
        candidate = model.get_submodule(".".join(parts[:depth]))
        if isinstance(candidate, FSDPModule):
            return candidate
    return None


def check_unsharded(argument: str, tensor: torch.Tensor | None, unit: nn.Module | None) -> None:
    """Refuse a head parameter that is still a DTensor where it should be gathered."""
    if not isinstance(tensor, DTensor):
        return
    if unit is None:
        # sharded by something outside the model: a unit wrapping it, or tensor parallelism
        hint = (
            "no FSDP unit inside the model owns it; call through the forward of the module "
            "fully_shard was applied to, or pass that module as the model"
        )
    else:
        hint = (
            f"its FSDP unit ({type(unit).__name__}) ran its forward without gathering it; "
            "put the LM head and any parameter tied to it in one fully_shard unit"
        )
    fail(
        argument,
        "the LM head's parameter gathered by FSDP",
        f"a DTensor placed {tuple(tensor.placements)}: {hint}",
    )
