"""During LenalignDPOTrainer's training and evaluation the LM head's module forward is
never called, no [2B, T, V] tensor exists, and no op touches a tensor of more vocabulary
rows than the batch has counted positions. The same watch flags DPOTrainer, whose fused
head projects every position on CPU, so the watch can see what it looks for."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from trl import DPOConfig, DPOTrainer
from trl_helpers import (
    VocabRows,
    forbid_forward,
    make_trainer,
    preference_dataset,
    profiled_vocab_rows,
)

from lenalign.integrations.trl import LenalignDPOConfig, LenalignDPOTrainer


def counted_rows(trainer) -> int:
    """The most counted label positions of any training or evaluation batch."""
    loaders = (trainer.get_train_dataloader(), trainer.get_eval_dataloader())
    return max(int(batch["completion_mask"][:, 1:].sum()) for loader in loaders for batch in loader)


def watched_run(trainer_cls, config_cls, output_dir):
    trainer = make_trainer(
        trainer_cls, config_cls, output_dir, max_steps=2, eval_dataset=preference_dataset(4, 1)
    )
    config = trainer.model.config
    vocab, hidden = config.vocab_size, config.hidden_size
    with (
        profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof,
        VocabRows(vocab) as watch,
    ):
        trainer.train()
        trainer.evaluate()
    return trainer, watch, profiled_vocab_rows(prof, vocab, hidden)


def test_head_forward_never_runs_and_only_counted_rows_are_projected(tmp_path):
    trainer = make_trainer(LenalignDPOTrainer, LenalignDPOConfig, tmp_path / "hooks")
    forbid_forward(trainer.model.get_output_embeddings())
    forbid_forward(trainer.ref_model.get_output_embeddings())
    trainer.train()
    # the hook has teeth: the model's own forward does call the head
    with pytest.raises(AssertionError, match="LM head"):
        trainer.model(input_ids=torch.tensor([[5, 6, 7]]))

    trainer, watch, profiled_rows = watched_run(
        LenalignDPOTrainer, LenalignDPOConfig, tmp_path / "lenalign"
    )
    bound = counted_rows(trainer)
    assert watch.padded == []
    assert 0 < profiled_rows <= bound
    assert watch.rows <= bound


def test_the_watch_flags_dpo_trainer(tmp_path):
    trainer, watch, profiled_rows = watched_run(DPOTrainer, DPOConfig, tmp_path / "trl")
    # TRL's CPU path scores every position (its counted-rows path is CUDA/XPU only)
    bound = counted_rows(trainer)
    assert profiled_rows > bound
    assert watch.rows > bound
