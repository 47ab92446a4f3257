"""The policy as each rank trains it: plain, wrapped in DDP, or sharded with FSDP2.

``ParallelPolicy`` owns what differs between the three: the training forward, gradient
accumulation, clipping, and the checkpoints' full states.

- **ddp**: the loss's forward runs through ``DistributedDataParallel``'s own forward, which
  is what makes DDP all-reduce the gradients: ``CausalLMLogProbs`` (lenalign.distributed)
  with ``fused_head``, else ``CausalLMLogits``. The reference model stays a plain copy on
  each rank; it needs no gradient and so no synchronization.
- **fsdp**: ``fully_shard`` on every decoder layer (the classes the model lists as
  ``_no_split_modules``), then on the model; the reference is sharded alike, with
  ``reshard_after_forward=True`` so that its root is freed after each no-grad forward.
  ``forward_outputs`` scores a sharded model through ``causal_lm_logprobs`` for the
  fused head and through the model's own forward for the logits.

Both average the gradients over the ranks, so equal shares of a micro-batch, each rank's
loss the mean over its share, give the single process's gradient; the norm that
``clip_grad_norm_`` computes is then the global one (from DTensor gradients under FSDP2).
A checkpoint holds the full weights and the optimizer state in ``optimizer.state_dict()``'s
own layout, whatever the mode, so a checkpoint of any mode resumes in any other of the
same number of ranks (or on rank 0 alone).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..distributed import CausalLMLogProbs
from ..integrations.hf import forward_logits
from .checkpoint import current_rng_state, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .parallel import World
from .step import Outputs, forward_outputs

# the full states of a checkpoint: gathered whole, to CPU, on rank 0 (None elsewhere)
FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)
FULL = StateDictOptions(full_state_dict=True)


class CausalLMLogits(nn.Module):
    """A causal LM whose ``forward(batch)`` is its [R, T, V] logits (``forward_logits``):
    the logits path's training forward, for DDP to run as its own."""

    def __init__(self, model: PreTrainedModel, *, amp: torch.dtype | None = None) -> None:
        super().__init__()
        self.model = model
        self.amp = amp

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The logits of a collated batch (``input_ids``, ``attention_mask`` [R, T])."""
        return forward_logits(self.model, dict(batch), self.amp)


def shard_model(
    model: nn.Module, world: World, *, reshard_after_forward: bool | None = None
) -> None:
    """``fully_shard`` each decoder layer of a Hugging Face model, then the model itself.

    The layers are the outermost modules of the classes in ``model._no_split_modules``
    (the blocks transformers never splits across devices); the root unit keeps the rest:
    embeddings, final norm and LM head, tied or not. ``reshard_after_forward`` is
    ``fully_shard``'s (None: its default, which keeps the root gathered for the backward).
    """
    mesh = init_device_mesh(world.device.type, (world.size,))
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    sharded: list[str] = []
    for name, module in model.named_modules():
        inside = any(name.startswith(prefix + ".") for prefix in sharded)
        if name and not inside and type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
            sharded.append(name)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)


class ParallelPolicy:
    """A rank's policy and what its training needs: forward, accumulation, clipping,
    checkpoints. With ``world.mode == "none"`` it is the single-process trainer's code.

    Args:
        world: the run's World.
        model: the policy, on ``world.device``; sharded in place under fsdp.
        reference: the frozen reference copy, or None; sharded in place under fsdp.
        amp: autocast dtype of the forwards, or None.
        fused_head: score through the fused head instead of the logits.
    """

    def __init__(
        self,
        world: World,
        model: PreTrainedModel,
        reference: PreTrainedModel | None,
        amp: torch.dtype | None,
        fused_head: bool,
    ) -> None:
        self.world, self.model, self.amp, self.fused_head = world, model, amp, fused_head
        self.ddp: DistributedDataParallel | None = None
        if world.mode == "fsdp":
            shard_model(model, world)
            if reference is not None:
                shard_model(reference, world, reshard_after_forward=True)
        elif world.mode == "ddp":
            wrapped = (
                CausalLMLogProbs(model, amp=amp) if fused_head else CausalLMLogits(model, amp=amp)
            )
            ids = [world.device.index] if world.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(wrapped, device_ids=ids)

    def train(self) -> None:
        """Put the policy in training mode."""
        (self.model if self.ddp is None else self.ddp).train()

    def forward(self, batch: dict[str, torch.Tensor]) -> Outputs:
        """The training forward of this rank's share: what ``batch_loss`` takes."""
        if self.ddp is not None:
            return self.ddp(batch)
        return forward_outputs(self.model, batch, self.amp, self.fused_head)

    @contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """The forward and backward of one micro-batch; gradients are synchronized over
        the ranks only in the ``last`` of a step (the others accumulate locally)."""
        if self.ddp is not None:
            with nullcontext() if last else self.ddp.no_sync():
                yield
        elif isinstance(self.model, FSDPModule):
            self.model.set_requires_gradient_sync(last)
            yield
        else:
            yield

    def clip_gradients(self, limit: float) -> float:
        """Clip the gradients to a total norm of ``limit``; the norm before clipping.

        The gradients are the averaged ones (DDP) or their shards (FSDP2: DTensors, whose
        norm ``clip_grad_norm_`` reduces over the ranks), so the norm is the global one.
        """
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), limit)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        return float(norm)

    def reshard(self) -> None:
        """Free the gathered parameters that a no-grad forward (evaluation) left.

        FSDP2 keeps the root unit's parameters gathered after its forward, for the
        backward that follows in training; after evaluation none follows.
        """
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def save(
        self,
        output_dir: Path,
        tokenizer: PreTrainedTokenizerBase,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        step: int,
        config: TrainConfig,
    ) -> Path:
        """Write ``output_dir/checkpoint-<step>`` from rank 0, every rank's states in it.

        Every rank takes part (the states are gathered to rank 0 first: the RNG of each,
        under FSDP2 the full weights and optimizer state); rank 0 alone writes, through
        ``save_checkpoint``'s temporary directory and rename, and no rank returns before
        the checkpoint is in place.
        """
        rng_states = self.world.gather(current_rng_state())
        model_state = optimizer_state = None
        if isinstance(self.model, FSDPModule):
            model_state = get_model_state_dict(self.model, options=FULL_ON_RANK0)
            # gathered, a tied weight is two tensors that save_pretrained would both
            # write; it keeps the first name only, as from the unsharded model
            for name in tied_names(self.model):
                model_state.pop(name, None)
            named = get_optimizer_state_dict(self.model, optimizer, options=FULL_ON_RANK0)
            if self.world.main:
                optimizer_state = by_position(named, parameter_names(self.model, optimizer))
        # from rank 0, its outcome to every rank: a failed write (a full disk) raises on
        # all of them instead of leaving the others at a barrier until the timeout
        final = self.world.from_main(
            lambda: save_checkpoint(
                output_dir,
                self.model,
                tokenizer,
                optimizer,
                scheduler,
                step,
                config,
                rng_states=rng_states,
                model_state_dict=model_state,
                optimizer_state=optimizer_state,
            )
        )
        self.world.barrier()
        return final

    def load(
        self,
        path: Path,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
    ) -> int:
        """Restore a checkpoint on this rank (its own RNG state); return its step."""
        load_states = None
        if isinstance(self.model, FSDPModule):

            def load_states(model_state: dict[str, torch.Tensor], stored: dict[str, Any]) -> None:
                # every rank holds the full states and keeps its shards of them
                set_model_state_dict(self.model, model_state, options=FULL)
                named = by_name(stored, parameter_names(self.model, optimizer))
                set_optimizer_state_dict(self.model, optimizer, named, options=FULL)

        return load_checkpoint(
            path, self.model, optimizer, scheduler, rank=self.world.rank, load_states=load_states
        )


def tied_names(model: nn.Module) -> list[str]:
    """The names of a parameter after its first, for parameters shared between modules."""
    seen: set[int] = set()
    later = []
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            later.append(name)
        seen.add(id(parameter))
    return later


def parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each of ``optimizer``'s parameters, in its order: position i of
    ``optimizer.state_dict()`` is the parameter named entry i (as torch.distributed's
    state dicts name it, by ``model.named_parameters()``)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for p in chain.from_iterable(g["params"] for g in optimizer.param_groups)]


def by_position(named: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An optimizer state keyed by parameter name (``get_optimizer_state_dict``) in
    ``optimizer.state_dict()``'s layout, keyed by position."""
    position = {name: i for i, name in enumerate(names)}
    return {
        "state": {position[name]: value for name, value in named["state"].items()},
        "param_groups": [
            {**group, "params": [position[name] for name in group["params"]]}
            for group in named["param_groups"]
        ],
    }


def by_name(stored: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """``by_position`` undone: ``optimizer.state_dict()``'s layout keyed by name, for
    ``set_optimizer_state_dict``."""
    return {
        "state": {names[i]: value for i, value in stored["state"].items()},
        "param_groups": [
            {**group, "params": [names[i] for i in group["params"]]}
            for group in stored["param_groups"]
        ],
    }
