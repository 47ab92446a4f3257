"""``LenalignSFTTrainer``: TRL's SFTTrainer with lenalign scoring the LM head's input.

SFTTrainer (trl 1.16) patches the model with TRL's fused head and calls
``model(**inputs, fused_lm_head=True)`` for per-token log-probabilities, entropy and
top-1 flags. Here the same call carries ``lenalign_head=HeadRequest(...)`` instead, into
the forward that ``head.install_lenalign_head`` adds beside TRL's: the backbone runs and
``linear_sequence_logprobs`` scores its output against the head's weight, counted rows
only, with the per-sequence sums and counts and the per-token TokenStats in one pass.

The loss paths that need the full logits or the model's own loss stay TRL's, unchanged:
``compute_loss_func``, label smoothing (``label_smoothing_factor`` with loss_type "nll"),
DeepSpeed sequence parallelism, and batches with pre-shifted ``shift_labels``.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from trl import SFTTrainer
from trl.trainer.utils import get_config_model_id

from ...checks import fail
from ...losses import sequence_score
from ...outputs import SequenceLogProbs
from .head import HeadRequest, install_under_wrappers
from .sft_config import LenalignSFTConfig, resolve_sft_normalization


def packed_cu_seqlens(inputs: dict[str, Any]) -> torch.Tensor | None:
    """[S + 1] int32 boundaries of a padding-free batch, from its ``position_ids``
    restarting at 0 (each 0 starts a sequence, as TRL's collator builds them); None for a
    padded batch (one with an ``attention_mask``, or several rows)."""
    position_ids = inputs.get("position_ids")
    if position_ids is None or "attention_mask" in inputs or position_ids.shape[0] != 1:
        return None
    starts = position_ids[0] == 0
    starts[0] = True
    boundaries = starts.nonzero().flatten()
    end = torch.tensor([position_ids.shape[1]], device=boundaries.device)
    return torch.cat([boundaries, end]).to(torch.int32)


def sequence_sums(values: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """[S] per-sequence sums of [B, T] per-token values (rows) or of a packed [1, N] row
    (segments of ``cu_seqlens``)."""
    if cu_seqlens is None:
        return values.sum(dim=1)
    # each segment summed in a fixed order, as torch_backend.segment_reduce does (index_add
    # uses atomics on GPUs: not reproducible bit for bit)
    lengths = cu_seqlens.diff().to(values.device)
    return torch.segment_reduce(values.reshape(-1), "sum", lengths=lengths, initial=0)


class LenalignSFTTrainer(SFTTrainer):
    """SFTTrainer whose default loss ("nll", and "dft") and metrics come from lenalign.

    Switching a TRL script is an import line and two class names::

        from lenalign.integrations.trl import LenalignSFTConfig, LenalignSFTTrainer

    Every SFTConfig field keeps its meaning; ``LenalignSFTConfig`` adds
    ``length_normalization`` ("token", SFTTrainer's loss, by default), and a plain
    SFTConfig is accepted as "token". With "token" the loss, the logged metrics (``loss``,
    ``entropy``, ``mean_token_accuracy``, ``num_tokens``) and the gradients are
    SFTTrainer's to float rounding. No [N, V] logits are formed on any device (TRL's CPU
    fallback projects every position). Padding-free batches (``padding_free=True``,
    ``packing`` with "bfd") are scored per packed sequence through ``cu_seqlens`` built
    from the restarting ``position_ids``.

    Args:
        model, args, and the rest: as for ``trl.SFTTrainer``. ``args`` defaults to a
            LenalignSFTConfig named after the model.

    Raises:
        ValueError: naming the field, for a bad ``length_normalization``, a per-sequence
            ``length_normalization`` with ``compute_loss_func`` or label smoothing (whose
            loss is TRL's token mean), and an LM head or logit transform lenalign does
            not reproduce.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "sft", "lenalign"]

    def __init__(self, model: Any, args: Any = None, *positional: Any, **kwargs: Any) -> None:
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = LenalignSFTConfig(f"{name.split('/')[-1]}-SFT")
        self._exponent = resolve_sft_normalization(args)
        super().__init__(model, args, *positional, **kwargs)
        if self._exponent is not None and not self._lenalign_loss():
            fail(
                "length_normalization",
                "'token' with compute_loss_func or label smoothing (their loss is "
                "SFTTrainer's own token mean)",
                repr(self.args.length_normalization),
            )
        # installed above TRL's fused forward: without lenalign_head, TRL's runs
        install_under_wrappers(self.model, self.accelerator)

    def _lenalign_loss(self) -> bool:
        """Whether the loss branch SFTTrainer would take is the fused-head one ("nll"
        without compute_loss_func or label smoother, or "dft")."""
        if self.compute_loss_func is not None:
            return False
        return self.label_smoother is None or self.args.loss_type != "nll"

    def _trl_branch(self, inputs: dict[str, Any]) -> bool:
        """Whether this batch goes to SFTTrainer's own compute_loss, unchanged."""
        config = getattr(self.accelerator, "parallelism_config", None)
        deepspeed_sp = (
            config is not None
            and getattr(config, "sp_backend", None) == "deepspeed"
            and getattr(config, "sp_enabled", False)
            and self.model.training
        )
        return deepspeed_sp or not self._lenalign_loss() or "shift_labels" in inputs

    def _loss_scaled_by_trainer(self, num_items_in_batch: Any) -> bool:
        """Whether Trainer leaves gradient accumulation to the loss (it then does not divide
        it by the accumulation steps): its own rule, ``Trainer.training_step``."""
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool(self.model_accepts_loss_kwargs) and num_items_in_batch is not None

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """SFTTrainer's loss of one batch and its metrics, from lenalign's scores.

        "token": sum of token losses / num_items_in_batch (the micro-batch's count when
        None), times the processes with ``average_tokens_across_devices``, as SFTTrainer.
        Per-sequence modes: mean over the micro-batch's sequences with a scored token of
        -sum / count**lambda, divided by the accumulation steps where Trainer leaves that
        to the loss (it passed num_items_in_batch), so that each micro-batch weighs
        equally; DDP then averages the ranks' means.
        """
        if self._trl_branch(inputs):
            if self._exponent is not None:
                fail(
                    "length_normalization",
                    "'token' under sequence parallelism (a rank holds a slice of each "
                    "sequence; SFTTrainer's token mean is the only loss there)",
                    repr(self.args.length_normalization),
                )
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True
        model_kwargs = {key: value for key, value in inputs.items() if key != "labels"}
        cu_seqlens = packed_cu_seqlens(inputs)
        dft = self.args.loss_type == "dft"
        request = HeadRequest(inputs["labels"], cu_seqlens, token_logprobs=dft, token_stats=True)
        # accelerate's mixed precision wraps the prepared model's forward; the head can sit
        # above that wrapper, so enter it here too (as LenalignDPOTrainer does)
        with self.accelerator.autocast():
            outputs = model(**model_kwargs, lenalign_head=request)
        logps = outputs.logps
        loss = self._loss(logps, cu_seqlens, num_items_in_batch)
        if self.aux_loss_enabled:
            steps = (
                self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            )
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps
        self._record_metrics(mode, inputs, logps, outputs.aux_loss)
        if return_outputs:
            warnings.warn(
                "`return_outputs=True` (compute_metrics, preprocess_logits_for_metrics) is "
                "deprecated in TRL and recomputes the full logits with an extra forward pass",
                FutureWarning,
                stacklevel=2,
            )
            with torch.no_grad():
                return loss, model(**model_kwargs)
        return loss

    def _loss(
        self,
        logps: SequenceLogProbs,
        cu_seqlens: torch.Tensor | None,
        num_items_in_batch: torch.Tensor | int | None,
    ) -> torch.Tensor:
        if self.args.loss_type == "dft":
            # DFT (arXiv 2508.05629): each token's NLL weighted by its detached probability
            token = logps.token_logprobs
            sums = sequence_sums(token * token.detach().exp(), cu_seqlens)
        else:
            sums = logps.sum
        if self._exponent is None:
            count = logps.count.sum() if num_items_in_batch is None else num_items_in_batch
            loss = -sums.sum() / torch.as_tensor(count).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            return loss
        scores = sequence_score(logps._replace(sum=sums), self._exponent)  # 0 where count 0
        sequences = (logps.count > 0).sum().clamp(min=1)
        loss = -scores.sum() / sequences
        if self.model.training and self._loss_scaled_by_trainer(num_items_in_batch):
            loss = loss / self.current_gradient_accumulation_steps
        return loss

    def _record_metrics(
        self,
        mode: str,
        inputs: dict[str, Any],
        logps: SequenceLogProbs,
        aux_loss: torch.Tensor | None,
    ) -> None:
        """SFTTrainer's metrics, with its reductions and gathers, from lenalign's outputs."""
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        stats = logps.token_stats
        num_valid = gather(logps.count.sum()).sum()
        entropy_sum = gather(stats.entropy.detach().sum()).sum()
        num_correct = gather(stats.is_top1.sum()).sum()
        metrics["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
        accuracy = (num_correct / num_valid).item() if num_valid > 0 else 0.0
        metrics["mean_token_accuracy"].append(accuracy)
        if mode == "train":
            # padding-free batches have no attention_mask: every position is a token
            if "attention_mask" in inputs:
                seen = gather(inputs["attention_mask"].sum()).sum().item()
            elif "position_ids" in inputs:
                position_ids = inputs["position_ids"]
                local = torch.tensor(position_ids.size(1), device=position_ids.device)
                seen = gather(local).sum().item()
            else:
                fail("inputs", "'attention_mask' or 'position_ids' in the batch", sorted(inputs))
            self._total_train_tokens += seen // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        if self.aux_loss_enabled:
            metrics["aux_loss"].append(gather(aux_loss).mean().item())
