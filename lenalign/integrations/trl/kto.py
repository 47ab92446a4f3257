"""``LenalignKTOTrainer``: TRL's KTOTrainer with lenalign scoring the LM head's input.

KTOTrainer (trl 1.16) gets every log-likelihood it uses (the policy's, the reference's,
and both of the KL estimate's mismatched pairs, live or precomputed) from
``model(..., labels=labels, fused_lm_head=True)`` calls, and sums each completion's
per-token log-probabilities itself. Here ``fused_call.answer_fused_calls`` answers those
calls on the policy and the reference from ``linear_sequence_logprobs`` (counted rows
only, entropy and mean logits from the same pass), so KTOTrainer's own loss, KL estimate
and metrics run unchanged on lenalign's figures; with ``length_normalization`` != "sum"
the per-token log-probabilities are handed over divided by count**lambda, so that each
of KTOTrainer's sums is the normalized score sum / count**lambda.
"""

from __future__ import annotations

from typing import Any, ClassVar

from datasets import Dataset
from trl import KTOTrainer
from trl.trainer.utils import get_config_model_id

from .fused_call import answer_trainer_fused_calls
from .kto_config import LenalignKTOConfig, resolve_kto_exponent


class LenalignKTOTrainer(KTOTrainer):
    """KTOTrainer whose log-likelihoods, KL estimate and per-token metrics come from lenalign.

    Switching a TRL script is an import line and two class names::

        from lenalign.integrations.trl import LenalignKTOConfig, LenalignKTOTrainer

    Every KTOConfig field keeps its meaning; ``LenalignKTOConfig`` adds
    ``length_normalization`` ("sum", KTOTrainer's scores, by default), and a plain
    KTOConfig is accepted as "sum". With "sum" the losses, the logged metrics (``kl``,
    ``rewards/*``, ``logps/*``, ``logits/*``, ``entropy``, ``num_tokens``) and the
    gradients are KTOTrainer's to float rounding, for both loss types ("kto",
    "apo_zero_unpaired"), with or without a reference model, a PEFT reference, and
    precomputed reference scores. No [N, V] logits are formed on any device.

    Args:
        model, ref_model, args, and the rest: as for ``trl.KTOTrainer``. ``args``
            defaults to a LenalignKTOConfig named after the model.

    Raises:
        ValueError: naming the field, for a bad ``length_normalization`` (or one != "sum"
            with a loss type not known to sum), and an LM head or logit transform
            lenalign does not reproduce.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "kto", "lenalign"]

    def __init__(
        self, model: Any, ref_model: Any = None, args: Any = None, *positional: Any, **kwargs: Any
    ) -> None:
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = LenalignKTOConfig(f"{name.split('/')[-1]}-KTO")
        self._exponent = resolve_kto_exponent(args)
        super().__init__(model, ref_model, args, *positional, **kwargs)
        self._answer_fused_calls()

    def _answer_fused_calls(self) -> None:
        """lenalign answers the fused-head calls of the policy and the reference."""
        answer_trainer_fused_calls(self, length_exponent=self._exponent)

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """KTOTrainer's precomputation, on lenalign's scores: it runs inside
        ``KTOTrainer.__init__``, after TRL patched the heads, so lenalign answers from
        here on. Its cache is keyed by the reference model's hash; the key here also
        names lenalign and lambda, so that scores of another normalization (or of TRL's
        head) are never read back as these."""
        self._answer_fused_calls()
        unkeyed = self.__dict__.setdefault("_unkeyed_model_hash", self._precompute_model_hash)
        self._precompute_model_hash = (unkeyed, "lenalign", self._exponent)
        return super()._precompute_ref_logps(dataset, name, batch_size)
