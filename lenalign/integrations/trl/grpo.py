"""``LenalignGRPOTrainer``: TRL's GRPOTrainer with lenalign scoring the LM head's input.

GRPOTrainer (trl 1.16) gets every log-probability it uses (the policy's in the loss,
the old policy's over several iterations per generation, the reference's for the KL
term) and the per-token entropies (the ``entropy`` metric, ``top_entropy_quantile``'s
mask) from ``model(..., labels=labels, fused_lm_head=True)`` calls on the completion
tokens, with the logits divided by ``temperature``. Here ``fused_call`` answers those
calls on the policy and the reference from ``linear_sequence_logprobs`` (completion
rows only, entropy from the same pass), so GRPOTrainer's own loss types, importance
sampling levels, clipping and metrics run unchanged on lenalign's figures.
"""

from __future__ import annotations

from typing import Any, ClassVar

from trl import GRPOTrainer
from trl.trainer.utils import get_config_model_id

from .fused_call import answer_trainer_fused_calls
from .grpo_config import LenalignGRPOConfig, refuse_entropy_bonus


class LenalignGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose log-probabilities and entropies come from lenalign.

    Switching a TRL script is an import line and two class names::

        from lenalign.integrations.trl import LenalignGRPOConfig, LenalignGRPOTrainer

    Every GRPOConfig field keeps its meaning (a plain GRPOConfig is accepted too): every
    ``loss_type`` and both ``importance_sampling_level`` values, ``beta`` with a
    reference model or a PEFT policy's disabled adapter, ``num_iterations``,
    ``top_entropy_quantile``, ``temperature`` and ``cast_lm_head_to_fp32``. The losses,
    logged metrics and gradients are GRPOTrainer's to float rounding on the same
    generations. No [N, V] logits are formed on any device.

    Args:
        model, reward_funcs, args, and the rest: as for ``trl.GRPOTrainer``. ``args``
            defaults to a LenalignGRPOConfig named after the model.

    Raises:
        ValueError: naming the field, for the entropy bonus (``entropy_coef`` != 0,
            ``use_adaptive_entropy``), and an LM head or logit transform lenalign does
            not reproduce.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "grpo", "lenalign"]

    def __init__(
        self,
        model: Any,
        reward_funcs: Any = None,
        args: Any = None,
        *positional: Any,
        **kwargs: Any,
    ) -> None:
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = LenalignGRPOConfig(f"{name.split('/')[-1]}-GRPO")
        refuse_entropy_bonus(args)
        super().__init__(model, reward_funcs, args, *positional, **kwargs)
        # as GRPOTrainer's own heads: the same temperature and float32 projection for the
        # policy and the reference
        answer_trainer_fused_calls(
            self, temperature=args.temperature, float32_head=args.cast_lm_head_to_fp32
        )
