"""padding_free=True: each batch packed into one row (no padding, restarting positions,
no attention mask), the per-sequence reduction through cu_seqlens, and the same losses,
metrics and parameters as the padded batch; attention implementations that would mix
the packed sequences are refused."""

from __future__ import annotations

import math

import pytest
import torch
from trl_helpers import (
    assert_close_metrics,
    assert_same_history,
    assert_same_parameters,
    first_batch,
    make_trainer,
    tiny_model,
    trained,
)

from lenalign.integrations.trl import LenalignDPOConfig, LenalignDPOTrainer
from lenalign.integrations.trl.packing import pack_batch

SETTINGS = {
    "sigmoid mean": {"loss_type": ["sigmoid"], "length_normalization": "mean", "beta": 1.0},
    "ipo": {"loss_type": ["ipo"]},
}


def test_pack_batch_lays_sequences_end_to_end():
    input_ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]])
    attention_mask = (input_ids != 0).long()
    attention_mask[2] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    packed = pack_batch(input_ids, attention_mask, labels)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert packed.cu_seqlens.tolist() == [0, 3, 5, 9]
    assert torch.equal(packed.unpack(packed.labels), labels.masked_fill(labels == -100, 0))


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_padding_free_trains_as_padded(tmp_path, settings):
    padded = trained(LenalignDPOTrainer, LenalignDPOConfig, tmp_path / "padded", **settings)
    packed_model = tiny_model()
    seen = []
    packed_model.model.register_forward_pre_hook(
        lambda _module, args, kwargs: seen.append(
            (tuple(kwargs["input_ids"].shape), kwargs.get("attention_mask"))
        ),
        with_kwargs=True,
    )
    packed = trained(
        LenalignDPOTrainer,
        LenalignDPOConfig,
        tmp_path / "packed",
        model=packed_model,
        padding_free=True,
        **settings,
    )
    assert packed.padding_free
    # one row per forward, every token a real one, and no mask: the block-diagonal
    # attention comes from the restarting position_ids
    assert seen and all(shape[0] == 1 and mask is None for shape, mask in seen)
    assert_same_history(padded, packed)
    assert_same_parameters(padded.model, packed.model)


def test_padding_free_with_eager_attention(tmp_path):
    losses, metrics = [], []
    for padding_free in (False, True):
        trainer = make_trainer(
            LenalignDPOTrainer,
            LenalignDPOConfig,
            tmp_path / str(padding_free),
            model=tiny_model(attn_implementation="eager"),
            ref_model=tiny_model(1, attn_implementation="eager"),
            padding_free=padding_free,
        )
        with torch.no_grad():
            losses.append(trainer.compute_loss(trainer.model, first_batch(trainer)).item())
        metrics.append({key: values[-1] for key, values in trainer._metrics["train"].items()})
    assert math.isclose(*losses, rel_tol=1e-5)
    assert_close_metrics(*metrics)


def test_attention_that_would_mix_sequences_is_refused(tmp_path):
    model = tiny_model()
    model.config._attn_implementation = "paged|sdpa"
    with pytest.raises(ValueError, match=r"^padding_free: expected a model whose attention"):
        make_trainer(
            LenalignDPOTrainer, LenalignDPOConfig, tmp_path, model=model, padding_free=True
        )
