"""``LenalignDPOTrainer``: TRL's DPOTrainer with lenalign computing every log-likelihood.

It overrides the two places where DPOTrainer scores sequences, ``compute_loss`` and
``compute_ref_log_probs``; everything else (data preparation, the collator, reference
set-up, PEFT, precomputation, evaluation, logging, checkpoints) is DPOTrainer's own.
Each forward goes through the model's own call (so DDP, PEFT and autocast wrap it), into
a forward that ``head.install_lenalign_head`` adds beside TRL's fused one: the backbone
runs, and ``linear_sequence_logprobs`` scores its output against the LM head's weight,
counted rows only, with the per-token statistics that DPOTrainer logs from the same pass.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from accelerate.utils import is_peft_model
from transformers import PreTrainedModel
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import get_config_model_id, use_adapter

from ...checks import fail
from ...outputs import SequenceLogProbs
from .config import LenalignDPOConfig, resolve_settings
from .head import HeadRequest, install_under_wrappers
from .metrics import record_metrics
from .objectives import (
    PairScores,
    f_divergence_scores,
    ld_dpo_sums,
    normalized_scores,
    pair_loss,
    wpo_weights,
)
from .packing import check_packed_attention, pack_batch, unpack_logps

# batch entries that are not model inputs (DPOTrainer's own list)
NON_MODEL_KEYS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")
# what a padding-free forward may carry besides the packed tokens and positions
PACKABLE_KEYS = ("input_ids", "attention_mask", "use_cache", "output_router_logits")


class LenalignDPOTrainer(DPOTrainer):
    """DPOTrainer whose log-likelihoods, metrics and losses come from lenalign.

    Switching a TRL script is an import line and two class names::

        from lenalign.integrations.trl import LenalignDPOConfig as DPOConfig
        from lenalign.integrations.trl import LenalignDPOTrainer as DPOTrainer

    Every DPOConfig field keeps its meaning; ``LenalignDPOConfig`` adds
    ``length_normalization``, ``simpo_gamma`` and ``rdpo_alpha``, and a plain DPOConfig is
    accepted as "sum" with the defaults. With "sum" every loss type, metric and gradient
    is DPOTrainer's to float rounding. What differs: neither the policy's nor the
    reference's [2B, T, V] logits are formed (the LM head is applied to counted rows only,
    a chunk at a time, on every device), ``padding_free=True`` packs each batch into one
    row instead of falling back to padding, and the loss types "simpo" and "rdpo" exist.

    Args:
        model, ref_model, args, data_collator, train_dataset, eval_dataset,
            processing_class, compute_metrics, callbacks, optimizers,
            quantization_config, peft_config: as for ``trl.DPOTrainer``. ``args``
            defaults to a LenalignDPOConfig named after the model.

    Raises:
        ValueError: naming the field, for the settings ``config.resolve_settings``
            refuses, ``padding_free=True`` with a model whose attention would mix packed
            sequences (or a vision data set, or prompt-learning PEFT), and an LM head or
            logit transform that lenalign does not reproduce.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "dpo", "lenalign"]

    def __init__(
        self,
        model: str | PreTrainedModel,
        ref_model: PreTrainedModel | None = None,
        args: DPOConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Callable | None = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
    ) -> None:
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = LenalignDPOConfig(f"{name.split('/')[-1]}-DPO")
        # read before DPOTrainer's __init__, which already scores sequences when it
        # precomputes the reference log-probs
        self._length = resolve_settings(args)
        # model (or its wrapper) -> the causal LM with lenalign's forward; unwrapping asks
        # the package metadata whether peft is installed, too slow for every forward
        self._causal_lms: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # DPOTrainer turns padding_free off with a warning that it is unavailable; here it
        # is available, so hide it from DPOTrainer and restore it
        padding_free = args.padding_free
        args.padding_free = False
        try:
            super().__init__(
                model=model,
                ref_model=ref_model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                compute_metrics=compute_metrics,
                callbacks=callbacks,
                optimizers=optimizers,
                quantization_config=quantization_config,
                peft_config=peft_config,
            )
        finally:
            args.padding_free = padding_free
        if self._length.reference_free:
            # SimPO alone never runs a reference: release whichever DPOTrainer set up
            self.ref_model = None
        # refuse an unsupported head now rather than at the first step
        self._causal_lm(self.model)
        if self.ref_model is not None:
            self._causal_lm(self.ref_model)
        self.padding_free = padding_free
        if padding_free:
            self._check_padding_free()

    def _causal_lm(self, model: torch.nn.Module) -> PreTrainedModel:
        """The causal LM under ``model``'s wrappers, its forward taking ``lenalign_head``."""
        causal_lm = self._causal_lms.get(model)
        if causal_lm is None:
            causal_lm = self._causal_lms[model] = install_under_wrappers(model, self.accelerator)
        return causal_lm

    def _check_padding_free(self) -> None:
        if self._is_vision_dataset:
            fail("padding_free", "a text data set", "a vision data set (images)")
        unwrapped = self.accelerator.unwrap_model(self.model)
        if is_peft_model(unwrapped) and unwrapped.active_peft_config.is_prompt_learning:
            fail(
                "padding_free",
                "a model without prompt-learning PEFT (its virtual tokens need padding)",
                type(unwrapped.active_peft_config).__name__,
            )
        check_packed_attention(self._causal_lm(self.model), "model")
        if self.ref_model is not None:
            check_packed_attention(self._causal_lm(self.ref_model), "ref_model")

    def _score(
        self,
        model: torch.nn.Module,
        model_kwargs: dict[str, Any],
        labels: torch.Tensor,
        *,
        token_logprobs: bool,
        token_stats: bool,
    ) -> tuple[SequenceLogProbs, torch.Tensor | None]:
        """The 2B sequences' log-likelihoods under ``model``, and its MoE router loss.

        Returns:
            SequenceLogProbs with ``sum``, ``mean``, ``count`` [2B] and any per-token
            fields [2B, T], laid out as the padded batch even when packed; the aux loss
            [] or None.
        """
        self._causal_lm(model)
        packed = None
        if self.padding_free:
            extra = sorted(set(model_kwargs) - set(PACKABLE_KEYS))
            if extra:
                fail("padding_free", "a batch of input_ids and attention_mask", extra)
            packed = pack_batch(model_kwargs["input_ids"], model_kwargs["attention_mask"], labels)
            # no attention_mask: transformers isolates packed sequences only without one
            call_kwargs = {
                key: value
                for key, value in model_kwargs.items()
                if key not in ("input_ids", "attention_mask")
            }
            call_kwargs.update(input_ids=packed.input_ids, position_ids=packed.position_ids)
            request = HeadRequest(packed.labels, packed.cu_seqlens, token_logprobs, token_stats)
        else:
            call_kwargs = model_kwargs
            request = HeadRequest(labels, None, token_logprobs, token_stats)
        # accelerate applies mixed precision around the forward of a model it prepared;
        # the head's forward can be installed above that wrapper, so enter it here too
        with self.accelerator.autocast():
            outputs = model(**call_kwargs, lenalign_head=request)
        logps = outputs.logps
        if packed is not None:
            logps = unpack_logps(logps, packed)
        return logps, outputs.aux_loss

    def _summed(self, logps: SequenceLogProbs, completion_mask: torch.Tensor) -> torch.Tensor:
        """[2B] DPOTrainer's sequence log-likelihoods: the sums, or with ``ld_alpha`` the
        LD-DPO sums (tokens beyond the pair's shorter completion weighted by ld_alpha)."""
        if self.ld_alpha is None:
            return logps.sum
        return ld_dpo_sums(logps.token_logprobs, completion_mask, self.ld_alpha)

    def _model_inputs(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        model_kwargs = {key: value for key, value in inputs.items() if key not in NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        return labels, model_kwargs

    def _reference_context(self) -> contextlib.AbstractContextManager:
        """The PEFT adapter switch that turns the policy into its reference, if it is one."""
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            name = "ref" if "ref" in unwrapped.peft_config else None
            return use_adapter(unwrapped, adapter_name=name)
        return contextlib.nullcontext()

    def compute_ref_log_probs(
        self, model: torch.nn.Module, inputs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-likelihoods of one padded batch, as DPOTrainer's (for precompute).

        Returns:
            ([B], [B]) summed (or LD-DPO-weighted) log-likelihoods of the chosen and the
            rejected completions, float32.
        """
        labels, model_kwargs = self._model_inputs(inputs)
        sums = self._reference_sums(model, model_kwargs, labels, inputs["completion_mask"])
        return sums.chunk(2, dim=0)

    def _reference_sums(
        self,
        model: torch.nn.Module,
        model_kwargs: dict[str, Any],
        labels: torch.Tensor,
        completion_mask: torch.Tensor,
    ) -> torch.Tensor:
        """[2B] DPOTrainer's sequence log-likelihoods under the reference ``model`` (the
        policy itself with its PEFT adapter switched off, when there is no ref_model)."""
        # the frozen reference needs no router logits (nor their discarded aux loss)
        ref_kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self._reference_context(),
        ):
            logps, _ = self._score(
                model,
                ref_kwargs,
                labels,
                token_logprobs=self.ld_alpha is not None,
                token_stats=False,
            )
        return self._summed(logps, completion_mask)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | None = None,
    ):
        """DPOTrainer's loss of one batch, its metrics recorded, from lenalign's scores.

        ``num_items_in_batch`` is ignored, as by DPOTrainer (its losses are pair means).
        """
        mode = "train" if self.model.training else "eval"
        completion_mask = inputs["completion_mask"]
        labels, model_kwargs = self._model_inputs(inputs)
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        policy, aux_loss = self._score(
            model,
            model_kwargs,
            labels,
            token_logprobs=self.ld_alpha is not None or self.use_weighting,
            token_stats=True,
        )
        policy_sums = self._summed(policy, completion_mask)
        ref_sums = None
        if not self._length.reference_free:
            if self.precompute_ref_logps:
                ref_sums = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
            else:
                reference = self.model if self.ref_model is None else self.ref_model
                ref_sums = self._reference_sums(reference, model_kwargs, labels, completion_mask)
        scores = self._pair_scores(policy, policy_sums, ref_sums, completion_mask)
        loss = self._combined_loss(scores, policy)

        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss
            gathered = self.accelerator.gather_for_metrics(aux_loss)
            self._metrics[mode]["aux_loss"].append(gathered.mean().item())
        if scores.ref_chosen is None:
            rewards = (self.beta * scores.policy_chosen, self.beta * scores.policy_rejected)
        else:
            rewards = (self.beta * scores.chosen_logratios, self.beta * scores.rejected_logratios)
        record_metrics(
            self,
            mode,
            inputs["attention_mask"],
            policy.count,
            policy.token_stats,
            tuple(reward.detach() for reward in rewards),
            tuple(policy_sums.detach().chunk(2, dim=0)),
        )
        if return_outputs:
            # DPOTrainer's deprecated path for compute_metrics: the logits are recomputed
            # by the model's full forward, which forms them
            warnings.warn(
                "`return_outputs=True` (compute_metrics) is deprecated in TRL and recomputes "
                "the full logits with an extra forward pass",
                FutureWarning,
                stacklevel=2,
            )
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    def _pair_scores(
        self,
        policy: SequenceLogProbs,
        policy_sums: torch.Tensor,
        ref_sums: torch.Tensor | None,
        completion_mask: torch.Tensor,
    ) -> PairScores:
        """The [B] scores s(y) = sums / count**lambda of the batch, chosen and rejected."""
        exponent = self._length.exponent
        counts = policy.count
        policy_scores = normalized_scores(policy_sums, counts, exponent).chunk(2, dim=0)
        ref_scores = (None, None)
        if ref_sums is not None:
            # the reference scored the same tokens: its counts are the policy's
            ref_scores = normalized_scores(ref_sums.detach(), counts, exponent).chunk(2, dim=0)
        lengths = counts.to(policy_scores[0].dtype).chunk(2, dim=0)
        mask_tokens = completion_mask.sum(dim=1).to(policy_scores[0].dtype).chunk(2, dim=0)
        n_pairs = counts.shape[0] // 2
        # DPOTrainer's "sft": the token mean over all the batch's chosen tokens (0 / 0 is
        # NaN there too)
        sft_nll = -(policy.sum[:n_pairs].sum() / counts[:n_pairs].sum())
        return PairScores(
            policy_chosen=policy_scores[0],
            policy_rejected=policy_scores[1],
            ref_chosen=ref_scores[0],
            ref_rejected=ref_scores[1],
            chosen_lengths=lengths[0],
            rejected_lengths=lengths[1],
            chosen_mask_tokens=mask_tokens[0],
            rejected_mask_tokens=mask_tokens[1],
            sft_nll=sft_nll,
        )

    def _combined_loss(self, scores: PairScores, policy: SequenceLogProbs) -> torch.Tensor:
        """sum over loss types of weight * mean over pairs, WPO-weighted if asked."""
        delta = divergence = None
        if scores.ref_chosen is not None:
            divergence = f_divergence_scores(
                scores.chosen_logratios,
                scores.rejected_logratios,
                self.f_divergence_type,
                self.f_alpha_divergence_coef,
            )
            delta = divergence[0] - divergence[1]
        pair_weights = wpo_weights(policy) if self.use_weighting else None
        loss = 0.0
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            per_pair = pair_loss(
                loss_type,
                scores,
                delta,
                divergence,
                beta=self.beta,
                label_smoothing=self.label_smoothing,
                discopop_tau=self.args.discopop_tau,
                simpo_gamma=self._length.simpo_gamma,
                rdpo_alpha=self._length.rdpo_alpha,
            )
            if pair_weights is not None:
                per_pair = per_pair * pair_weights
            loss = loss + per_pair.mean() * weight
        return loss
