"""``LenalignRLOOTrainer``: TRL's RLOOTrainer with lenalign scoring the LM head's input.

RLOOTrainer (trl 1.16) gets the policy's, the old policy's and the reference's
per-token log-probabilities of the sampled completions, and the policy's entropies (a
logged metric), from ``model(..., labels=labels, fused_lm_head=True)`` calls, and sums
each completion's log-probabilities itself. Here ``fused_call`` answers those calls on
the policy and the reference from ``linear_sequence_logprobs`` (completion rows only,
entropy from the same pass); with ``length_normalization`` != "sum" the per-token
log-probabilities are handed over divided by count**lambda, so that each of
RLOOTrainer's sums is the normalized score sum / count**lambda (rloo_config.py).
"""

from __future__ import annotations

from typing import Any, ClassVar

from trl import RLOOTrainer
from trl.trainer.utils import get_config_model_id

from .fused_call import answer_trainer_fused_calls
from .rloo_config import LenalignRLOOConfig, resolve_rloo_exponent


class LenalignRLOOTrainer(RLOOTrainer):
    """RLOOTrainer whose log-probabilities and entropies come from lenalign.

    Switching a TRL script is an import line and two class names::

        from lenalign.integrations.trl import LenalignRLOOConfig, LenalignRLOOTrainer

    Every RLOOConfig field keeps its meaning; ``LenalignRLOOConfig`` adds
    ``length_normalization`` ("sum", RLOOTrainer's scores, by default), and a plain
    RLOOConfig is accepted as "sum". With "sum" the losses, logged metrics and gradients
    are RLOOTrainer's to float rounding on the same generations. No [N, V] logits are
    formed on any device.

    Args:
        model, reward_funcs, args, and the rest: as for ``trl.RLOOTrainer``. ``args``
            defaults to a LenalignRLOOConfig named after the model.

    Raises:
        ValueError: naming the field, for a bad ``length_normalization``, and an LM head
            or logit transform lenalign does not reproduce.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "rloo", "lenalign"]

    def __init__(
        self,
        model: Any,
        reward_funcs: Any,
        args: Any = None,
        *positional: Any,
        **kwargs: Any,
    ) -> None:
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = LenalignRLOOConfig(f"{name.split('/')[-1]}-RLOO")
        exponent = resolve_rloo_exponent(args)
        super().__init__(model, reward_funcs, args, *positional, **kwargs)
        # RLOOTrainer's heads divide by the temperature and project in the model's dtype
        answer_trainer_fused_calls(self, temperature=args.temperature, length_exponent=exponent)
