"""Shared set-up of the TRL integration's tests: a tiny Llama (and a tiny Mixtral) built in
code, a byte tokenizer, in-memory data sets (preference pairs for DPO, unpaired
completions for KTO, texts and prompt-completions for SFT), trainers of both kinds (TRL's
and lenalign's) run from the same seed on them (nothing is downloaded, nothing is
reported, output goes to tmp_path), and the watches that see whether a step forms
vocabulary-sized tensors.

Optimization is plain SGD: Adam divides each gradient element by its own running size,
so elements whose gradient is rounding noise move by the full learning rate in a random
direction, and the parameters of two correct implementations would differ by that; with
SGD they differ by the learning rate times the gradients' difference, which is the
quantity worth comparing.
"""

from __future__ import annotations

import math
import random
import warnings
from pathlib import Path

import torch
from datasets import Dataset
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from lenalign.train import build_byte_tokenizer, build_tiny_llama

POLICY_SEED = 0
REFERENCE_SEED = 1
# timings differ from run to run; everything else in log_history must agree
TIMING_KEYS = (
    *(
        f"{mode}_{name}"
        for mode in ("train", "eval")
        for name in ("runtime", "samples_per_second", "steps_per_second")
    ),
    "step_time",  # GRPOTrainer's and RLOOTrainer's own
)
RTOL = 1e-4
# for metrics whose value is a few ulps from 0 (a tie of rewards, a mean logit near 0)
ATOL = 1e-6


def preference_dataset(n: int = 8, seed: int = 0) -> Dataset:
    """``n`` pairs of random letters; chosen and rejected differ in length (2 to 9
    letters), so that summed and averaged scores rank them differently."""
    rng = random.Random(seed)

    def word(low: int, high: int) -> str:
        return "".join(rng.choice("abcdefghij") for _ in range(rng.randint(low, high)))

    rows = [
        {"prompt": f"q: {word(4, 9)}\n", "chosen": word(2, 9), "rejected": word(2, 9)}
        for _ in range(n)
    ]
    return Dataset.from_list(rows)


def tokenizer():
    return build_byte_tokenizer()


def tiny_model(seed: int = POLICY_SEED, attn_implementation: str | None = None):
    """The 2-layer, 64-wide Llama of lenalign.train with weights from ``seed``."""
    model = build_tiny_llama(build_byte_tokenizer(), seed)
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    return model


def untied_tiny_model(seed: int = POLICY_SEED) -> LlamaForCausalLM:
    """tiny_model with an LM head of its own (a copy of the embedding): a head split over
    the vocabulary cannot share its weight with an embedding that stays whole."""
    model = tiny_model(seed)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    return model


def tensor_parallel(model: LlamaForCausalLM, world: int) -> LlamaForCausalLM:
    """``model`` split over a 1-D mesh of ``world`` CPU ranks by torch's own styles, as
    Megatron splits a Llama: attention and MLP input projections by output column, their
    output projections by input row, and the LM head by vocabulary row (ColwiseParallel:
    its weight a DTensor placed Shard(0))."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    # the head's own forward (generation's) gathers its logits, as transformers'
    # "colwise_rep" for lm_head; the weight stays Shard(0)
    plan = {"lm_head": ColwiseParallel(output_layouts=Replicate())}
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj"):
        plan[f"model.layers.*.{name}"] = ColwiseParallel()
    plan["model.layers.*.mlp.gate_proj"] = ColwiseParallel()
    for name in ("self_attn.o_proj", "mlp.down_proj"):
        plan[f"model.layers.*.{name}"] = RowwiseParallel()
    return parallelize_module(model, init_device_mesh("cpu", (world,)), plan)


def config_kwargs(output_dir: Path, **overrides) -> dict:
    """DPOConfig fields for a 3-step CPU run; ``overrides`` win."""
    kwargs = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 2,
        "max_steps": 3,
        "logging_steps": 1,
        "report_to": "none",
        "bf16": False,
        "optim": "sgd",
        "learning_rate": 0.5,
        "save_strategy": "no",
        "seed": 0,
        "disable_tqdm": True,
        "gradient_checkpointing": False,
        "dataloader_pin_memory": False,
    }
    kwargs.update(overrides)
    return kwargs


def make_trainer(
    trainer_cls,
    config_cls,
    output_dir: Path,
    *,
    model=None,
    ref_model="seed",
    train_dataset=None,
    eval_dataset=None,
    peft_config=None,
    **overrides,
):
    """A trainer of ``trainer_cls`` on the tiny models and data; ``ref_model="seed"``
    builds a reference that differs from the policy (REFERENCE_SEED)."""
    if model is None:
        model = tiny_model(POLICY_SEED)
    if isinstance(ref_model, str) and ref_model == "seed":
        ref_model = tiny_model(REFERENCE_SEED)
    with warnings.catch_warnings():
        # TRL's notes on the byte tokenizer's prompt EOS and on an unseeded collator
        warnings.simplefilter("ignore")
        return trainer_cls(
            model=model,
            ref_model=ref_model,
            args=config_cls(**config_kwargs(output_dir, **overrides)),
            train_dataset=preference_dataset() if train_dataset is None else train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer(),
            peft_config=peft_config,
        )


def trained(trainer_cls, config_cls, output_dir: Path, **kwargs):
    trainer = make_trainer(trainer_cls, config_cls, output_dir, **kwargs)
    trainer.train()
    return trainer


def assert_close_metrics(expected: dict, got: dict, *, skip: tuple[str, ...] = ()) -> None:
    """The same keys, every value within RTOL (ATOL near 0), timings and ``skip`` aside."""
    ignored = set(TIMING_KEYS) | set(skip)
    expected_keys = {key for key in expected if key not in ignored}
    assert expected_keys == {key for key in got if key not in ignored}
    for key in sorted(expected_keys):
        assert math.isclose(expected[key], got[key], rel_tol=RTOL, abs_tol=ATOL), (
            key,
            expected[key],
            got[key],
        )


def assert_same_history(expected, got, *, skip: tuple[str, ...] = ()) -> None:
    """Two trainers' ``state.log_history`` agree entry by entry."""
    assert len(expected.state.log_history) == len(got.state.log_history)
    for expected_entry, got_entry in zip(
        expected.state.log_history, got.state.log_history, strict=True
    ):
        assert_close_metrics(expected_entry, got_entry, skip=skip)


def assert_same_parameters(expected: torch.nn.Module, got: torch.nn.Module) -> None:
    expected_parameters = dict(expected.named_parameters())
    got_parameters = dict(got.named_parameters())
    assert expected_parameters.keys() == got_parameters.keys()
    for name, parameter in expected_parameters.items():
        torch.testing.assert_close(
            got_parameters[name], parameter, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}"
        )


def first_batch(trainer) -> dict:
    """The trainer's first training batch, collated and on its device."""
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def float64_copy(model: torch.nn.Module) -> LlamaForCausalLM:
    """A float64 copy of a tiny model, with gradients, for formulas written in the test."""
    copy = tiny_model(POLICY_SEED)
    copy.load_state_dict(model.state_dict())
    return copy.double()


def completion_scores(
    model64: LlamaForCausalLM, batch: dict, exponent: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores [2B], sums [2B], counts [2B]) of the batch's completions in float64, from
    the model's own full logits: s = sum / count**exponent, written out in the test."""
    logits = model64(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].bool()
    picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    sums = (picked * mask).sum(dim=1)
    counts = mask.sum(dim=1).double()
    return sums / counts**exponent, sums, counts


class VocabRows(TorchDispatchMode):
    """The largest number of vocabulary rows (elements / V) of any op output whose last
    dimension is V, and every such output of three or more dimensions."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.rows, self.padded = vocab, 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            is_matrix = isinstance(tensor, torch.Tensor) and tensor.dim() >= 2
            if is_matrix and tensor.shape[-1] == self.vocab:
                self.rows = max(self.rows, tensor.numel() // self.vocab)
                if tensor.dim() >= 3:
                    self.padded.append(tuple(tensor.shape))
        return out


def profiled_vocab_rows(prof, vocab: int, hidden: int) -> int:
    """The same from the profiler's input shapes, which also sees the ops inside
    lenalign's registered operators (a dispatch mode sees only the operator)."""
    rows = 0
    for event in prof.events():
        for shape in event.input_shapes or ():
            # the head's weight, transposed for the matmul, is [H, V]: not logits
            if len(shape) >= 2 and shape[-1] == vocab and tuple(shape) != (hidden, vocab):
                rows = max(rows, int(torch.tensor(shape[:-1]).prod()))
    return rows


def forbid_forward(module: torch.nn.Module) -> None:
    def fail(*_):
        raise AssertionError("the LM head's forward was called")

    module.register_forward_hook(fail)


def tiny_mixtral(seed: int) -> MixtralForCausalLM:
    config = MixtralConfig(
        vocab_size=len(tokenizer()),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        output_router_logits=True,
        router_aux_loss_coef=0.02,
        pad_token_id=tokenizer().pad_token_id,
        eos_token_id=tokenizer().eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MixtralForCausalLM(config)


def text_dataset(n: int = 8, seed: int = 0) -> Dataset:
    """Language-modeling rows of random letters, 3 to 20 of them (lengths differ, so that
    token and sequence means differ)."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 20))) for _ in range(n)]
    return Dataset.from_list([{"text": word} for word in words])


def completion_dataset(n: int = 8, seed: int = 0) -> Dataset:
    rng = random.Random(seed)

    def word(low: int, high: int) -> str:
        return "".join(rng.choice("abcdefghij") for _ in range(rng.randint(low, high)))

    return Dataset.from_list(
        [{"prompt": f"q: {word(3, 8)}\n", "completion": word(2, 12)} for _ in range(n)]
    )


def make_sft(
    trainer_cls,
    config_cls,
    output_dir,
    *,
    model=None,
    dataset=None,
    eval_dataset=None,
    peft_config=None,
    **overrides,
):
    overrides.setdefault("max_length", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trainer_cls(
            model=tiny_model(POLICY_SEED) if model is None else model(),
            args=config_cls(**config_kwargs(output_dir, **overrides)),
            train_dataset=text_dataset() if dataset is None else dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer(),
            peft_config=peft_config,
        )


def trained_sft(trainer_cls, config_cls, output_dir, **kwargs):
    trainer = make_sft(trainer_cls, config_cls, output_dir, **kwargs)
    trainer.train()
    return trainer


def unpaired_dataset(n: int = 8, seed: int = 0, desirable: float | None = None) -> Dataset:
    """``n`` prompt-completion rows of random letters (completions 2 to 9 letters, so that
    summed and averaged scores differ); desirable and undesirable alternate, or each is
    desirable with probability ``desirable``."""
    rng = random.Random(seed)

    def word(low: int, high: int) -> str:
        return "".join(rng.choice("abcdefghij") for _ in range(rng.randint(low, high)))

    def label(i: int) -> bool:
        return i % 2 == 0 if desirable is None else rng.random() < desirable

    rows = [
        {"prompt": f"q: {word(4, 9)}\n", "completion": word(2, 9), "label": label(i)}
        for i in range(n)
    ]
    return Dataset.from_list(rows)


def model_or_path(model):
    """A path as it is (the trainer loads it), else the model the builder returns."""
    return model if isinstance(model, str) else model()


def make_kto(
    trainer_cls,
    config_cls,
    output_dir,
    *,
    model=None,
    ref_model="seed",
    dataset=None,
    eval_dataset=None,
    peft_config=None,
    **overrides,
):
    """A KTO trainer on the tiny models (``model``: a builder, or a path KTOTrainer loads);
    ``ref_model="seed"`` is a reference that differs from the policy, None lets the
    trainer build it from the policy's path (or disable the adapter)."""
    if ref_model == "seed":
        ref_model = tiny_model(REFERENCE_SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trainer_cls(
            model=model
            if isinstance(model, str)
            else tiny_model(POLICY_SEED)
            if model is None
            else model(),
            ref_model=ref_model,
            args=config_cls(**config_kwargs(output_dir, **overrides)),
            train_dataset=unpaired_dataset() if dataset is None else dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer(),
            peft_config=peft_config,
        )


def trained_kto(trainer_cls, config_cls, output_dir, **kwargs):
    trainer = make_kto(trainer_cls, config_cls, output_dir, **kwargs)
    trainer.train()
    return trainer
