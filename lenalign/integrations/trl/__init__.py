"""TRL's DPOTrainer on lenalign: a two-line switch of a TRL script.

::

    from lenalign.integrations.trl import LenalignDPOConfig, LenalignDPOTrainer

``LenalignDPOTrainer`` is a ``trl.DPOTrainer`` whose policy and reference
log-likelihoods come from ``lenalign.linear_sequence_logprobs`` on the hidden states
entering the LM head (counted rows only: no [2B, T, V] logits, the head module's forward
never called), whose logged per-token metrics come from lenalign's kernels in the same
pass, whose ``padding_free=True`` packs each batch into one row, and whose losses compare
length-normalized scores. ``LenalignDPOConfig`` is ``trl.DPOConfig`` with
``length_normalization``, ``simpo_gamma`` and ``rdpo_alpha``. docs/integrations.md has
the fields, the table of loss types and the measured figures.

Modules, one concern each: ``requirement`` (the TRL check), ``config`` (the config and
its checks), ``objectives`` (the loss formulas), ``head`` (the forward that scores the
LM head's input), ``packing`` (padding-free batches), ``metrics`` (DPOTrainer's logged
metrics), ``trainer`` (the trainer).

Public names: ``LenalignDPOConfig``, ``LenalignDPOTrainer``, ``LOSS_TYPES`` (the loss
types accepted), ``TESTED_TRL_SERIES``. Importing this package needs the ``[trl]`` extra
(``pip install 'lenalign[trl]'``); without it the ImportError says so.
"""

from .requirement import TESTED_TRL_SERIES, require_trl

require_trl()

from .config import LOSS_TYPES, LenalignDPOConfig  # noqa: E402  (after the TRL check)
from .trainer import LenalignDPOTrainer  # noqa: E402

__all__ = ["LOSS_TYPES", "TESTED_TRL_SERIES", "LenalignDPOConfig", "LenalignDPOTrainer"]
