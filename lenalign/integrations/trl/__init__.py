"""TRL's trainers on lenalign: a two-line switch of a TRL script.

::

    from lenalign.integrations.trl import LenalignDPOConfig, LenalignDPOTrainer
    from lenalign.integrations.trl import LenalignKTOConfig, LenalignKTOTrainer
    from lenalign.integrations.trl import LenalignSFTConfig, LenalignSFTTrainer
    from lenalign.integrations.trl import LenalignGRPOConfig, LenalignGRPOTrainer
    from lenalign.integrations.trl import LenalignRLOOConfig, LenalignRLOOTrainer

``LenalignDPOTrainer`` is a ``trl.DPOTrainer`` whose policy and reference
log-likelihoods come from ``lenalign.linear_sequence_logprobs`` on the hidden states
entering the LM head (counted rows only: no [2B, T, V] logits, the head module's forward
never called), whose logged per-token metrics come from lenalign's kernels in the same
pass, whose ``padding_free=True`` packs each batch into one row, and whose losses compare
length-normalized scores. ``LenalignDPOConfig`` is ``trl.DPOConfig`` with
``length_normalization``, ``simpo_gamma`` and ``rdpo_alpha``. docs/integrations.md has
the fields, the table of loss types and the measured figures.

``LenalignSFTTrainer`` is a ``trl.SFTTrainer`` whose default loss ("nll", and "dft") and
logged metrics come from the same head (no [N, V] logits), padding-free batches scored
per packed sequence; ``LenalignSFTConfig`` is ``trl.SFTConfig`` with
``length_normalization``: "token" (SFTTrainer's token mean), "sequence" or a lambda.

``LenalignKTOTrainer`` is a ``trl.KTOTrainer`` whose fused-head calls (policy, reference,
the KL estimate's pairs, precomputed reference scores) are answered by lenalign;
``LenalignKTOConfig`` is ``trl.KTOConfig`` with ``length_normalization`` ("sum", "mean"
or a lambda) on every score of the loss and the KL estimate.

``LenalignGRPOTrainer`` and ``LenalignRLOOTrainer`` are ``trl.GRPOTrainer`` and
``trl.RLOOTrainer`` whose fused-head calls (policy, old policy, reference, with the
entropies) are answered by lenalign; ``LenalignGRPOConfig`` is ``trl.GRPOConfig`` with
the entropy bonus refused (lenalign's entropy has no gradient), ``LenalignRLOOConfig``
``trl.RLOOConfig`` with ``length_normalization`` on its summed scores.

Modules, one concern each: ``requirement`` (the TRL check), ``config`` (the config and
its checks), ``objectives`` (the loss formulas), ``head`` (the forward that scores the
LM head's input), ``packing`` (padding-free batches), ``metrics`` (DPOTrainer's logged
metrics), ``trainer`` (the trainer), ``sft_config`` and ``sft`` (SFT's config and
trainer), ``fused_call`` (TRL's own ``fused_lm_head=True`` calls answered by lenalign),
``kto_config`` and ``kto`` (KTO's config and trainer), ``grpo_config`` and ``grpo``,
``rloo_config`` and ``rloo`` (GRPO's and RLOO's).

Public names: ``LenalignDPOConfig``, ``LenalignDPOTrainer``, ``LenalignKTOConfig``,
``LenalignKTOTrainer``, ``LenalignSFTConfig``, ``LenalignSFTTrainer``,
``LenalignGRPOConfig``, ``LenalignGRPOTrainer``, ``LenalignRLOOConfig``,
``LenalignRLOOTrainer``, ``LOSS_TYPES``
(the DPO loss types accepted), ``TESTED_TRL_SERIES``. Importing this package needs the
``[trl]`` extra (``pip install 'lenalign[trl]'``); without it the ImportError says so.
"""

from .requirement import TESTED_TRL_SERIES, require_trl

require_trl()

from .config import LOSS_TYPES, LenalignDPOConfig  # noqa: E402  (after the TRL check)
from .grpo import LenalignGRPOTrainer  # noqa: E402
from .grpo_config import LenalignGRPOConfig  # noqa: E402
from .kto import LenalignKTOTrainer  # noqa: E402
from .kto_config import LenalignKTOConfig  # noqa: E402
from .rloo import LenalignRLOOTrainer  # noqa: E402
from .rloo_config import LenalignRLOOConfig  # noqa: E402
from .sft import LenalignSFTTrainer  # noqa: E402
from .sft_config import LenalignSFTConfig  # noqa: E402
from .trainer import LenalignDPOTrainer  # noqa: E402

__all__ = [
    "LOSS_TYPES",
    "TESTED_TRL_SERIES",
    "LenalignDPOConfig",
    "LenalignDPOTrainer",
    "LenalignGRPOConfig",
    "LenalignGRPOTrainer",
    "LenalignKTOConfig",
    "LenalignKTOTrainer",
    "LenalignRLOOConfig",
    "LenalignRLOOTrainer",
    "LenalignSFTConfig",
    "LenalignSFTTrainer",
]
