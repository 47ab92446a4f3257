"""A training step of a TRL trainer against its lenalign switch: DPOTrainer against
LenalignDPOTrainer, or with ``--kind sft`` SFTTrainer against LenalignSFTTrainer, with
``--kind kto`` KTOTrainer against LenalignKTOTrainer, ``--kind grpo`` GRPOTrainer against
LenalignGRPOTrainer, ``--kind rloo`` RLOOTrainer against LenalignRLOOTrainer.

    python benchmarks/trl_step.py                 # CPU: DPO, the two cases below
    python benchmarks/trl_step.py --kind sft --case vocab128k --steps 8

Both trainers get the same model (built from a config, seeded), the same in-memory data
set (preference pairs for DPO; the chosen completions as prompt-completion rows for SFT,
which then trains on the completions only, SFTTrainer's default; for KTO each pair as two
unpaired rows, the chosen desirable and the rejected not, twice the pairs a step, so that
a step scores as many completions as DPO's, plus KTO's KL pairs; for GRPO and RLOO the
prompts, 2 completions sampled for each of a step's pairs' prompts, a fixed reward, and
a reference with beta 0.04: the step generates, then scores the completions with the
reference (and for RLOO the policy without gradient, its old log-probabilities) and the
policy with gradient) and the same config
(TRL's defaults; bf16 on a GPU, fp32 on CPU), and run in their own fresh process, one
after the other. A callback
times every optimizer step and measures its peak memory above the level at the step's
start (the host's resident memory on CPU, PyTorch's allocator on a GPU); the first
``--warmup`` steps are dropped, and the median time and the largest peak are reported.
Before timing, each step's loss must agree between the two (relative 1e-3, or 1e-6 absolute).

Cases: ``tiny`` is the tests' model and data (lenalign.train's 2-layer, 64-wide Llama,
259-token byte vocabulary, 4 pairs a step); ``vocab128k`` is a 2-layer, 256-wide Llama
with Llama 3's 128256-token vocabulary, 2 pairs of 128-byte prompts and 128-byte
completions a step, where the LM head dominates.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch

CASES = {
    "tiny": {"vocab": None, "hidden": 64, "pairs": 4, "prompt": (4, 9), "completion": (2, 9)},
    "vocab128k": {
        "vocab": 128256,
        "hidden": 256,
        "pairs": 2,
        "prompt": (128, 128),
        "completion": (96, 128),
    },
}
TRAINERS = ("trl", "lenalign")
# kind -> TRL's config and trainer; lenalign's are the same names prefixed "Lenalign", in
# lenalign.integrations.trl
KINDS = {
    "dpo": ("DPOConfig", "DPOTrainer"),
    "sft": ("SFTConfig", "SFTTrainer"),
    "kto": ("KTOConfig", "KTOTrainer"),
    "grpo": ("GRPOConfig", "GRPOTrainer"),
    "rloo": ("RLOOConfig", "RLOOTrainer"),
}
# GRPO and RLOO: completions sampled per prompt, and the KL coefficient (a reference
# model, built by both trainers from the policy's path)
GENERATIONS = 2
RL_BETA = 0.04


def letter_reward(completions: list[str], **_) -> list[float]:
    """GRPO's and RLOO's reward: the share of a completion's characters that sort after
    'e' (letters f-z, and any other character above it)."""
    return [sum(c > "e" for c in text) / max(len(text), 1) for text in completions]


def classes(kind: str, trainer_name: str) -> tuple[type, type]:
    """The (config, trainer) classes of ``kind`` for "trl" or "lenalign"."""
    import trl

    import lenalign.integrations.trl as ours

    if trainer_name == "trl":
        return tuple(getattr(trl, name) for name in KINDS[kind])
    return tuple(getattr(ours, f"Lenalign{name}") for name in KINDS[kind])


def build(case: dict, seed: int):
    """The case's model, byte tokenizer and data set (enough pairs for the steps)."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    from lenalign.train import build_byte_tokenizer, build_tiny_llama

    tokenizer = build_byte_tokenizer()
    if case["vocab"] is None:
        model = build_tiny_llama(tokenizer, seed)
    else:
        config = LlamaConfig(
            vocab_size=case["vocab"],
            hidden_size=case["hidden"],
            intermediate_size=4 * case["hidden"],
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=True,
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    rng = random.Random(seed)

    def text(bounds: tuple[int, int]) -> str:
        return "".join(rng.choice("abcdefghij") for _ in range(rng.randint(*bounds)))

    rows = [
        {
            "prompt": text(case["prompt"]),
            "chosen": text(case["completion"]),
            "rejected": text(case["completion"]),
        }
        for _ in range(64)
    ]
    return model, tokenizer, Dataset.from_list(rows)


def worker(kind: str, trainer_name: str, case_name: str, steps: int, device_type: str) -> dict:
    """One trainer's run in this process: per-step seconds, peak bytes and losses."""
    from transformers import TrainerCallback

    from lenalign.bench import peak_memory_probe, synchronize

    Config, Trainer = classes(kind, trainer_name)
    device = torch.device(device_type)
    case = CASES[case_name]
    model, tokenizer, dataset = build(case, seed=0)
    extra = {}
    rows_per_step = case["pairs"]
    if kind in ("dpo", "kto"):
        extra["ref_model"] = build(case, seed=1)[0]
    if kind == "sft":
        dataset = dataset.map(
            lambda row: {"prompt": row["prompt"], "completion": row["chosen"]},
            remove_columns=["chosen", "rejected"],
        )
    elif kind == "kto":
        rows_per_step = 2 * case["pairs"]
        dataset = dataset.map(
            lambda batch: {
                "prompt": batch["prompt"] * 2,
                "completion": batch["chosen"] + batch["rejected"],
                "label": [True] * len(batch["prompt"]) + [False] * len(batch["prompt"]),
            },
            batched=True,
            remove_columns=["chosen", "rejected"],
        )
    elif kind in ("grpo", "rloo"):
        # the prompts; each step samples GENERATIONS completions of up to the case's
        # longest completion for each of the case's pairs' prompts
        rows_per_step = GENERATIONS * case["pairs"]
        dataset = dataset.map(
            lambda row: {"prompt": row["prompt"]}, remove_columns=["chosen", "rejected"]
        )
        extra["reward_funcs"] = letter_reward
    probe = peak_memory_probe(device)
    records: list[dict] = []

    class StepProbe(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            synchronize(device)
            probe.start()
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            records.append({"seconds": time.perf_counter() - self.started, "peak": probe.stop()})

    with tempfile.TemporaryDirectory() as output_dir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rl_fields = {}
        if kind in ("grpo", "rloo"):
            vocab = model.config.vocab_size
            # the trainers build the reference from the policy's path
            model.save_pretrained(f"{output_dir}/model")
            tokenizer.save_pretrained(f"{output_dir}/model")
            model = f"{output_dir}/model"
            rl_fields = {
                "num_generations": GENERATIONS,
                "max_completion_length": case["completion"][1],
                "beta": RL_BETA,
                # sample only the byte tokenizer's ids (a larger vocabulary's others have
                # no text to decode for the reward)
                "generation_kwargs": {"suppress_tokens": list(range(len(tokenizer), vocab))},
            }
        args = Config(
            output_dir=output_dir,
            per_device_train_batch_size=rows_per_step,
            max_steps=steps,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            bf16=device.type == "cuda",
            use_cpu=device.type == "cpu",
            dataloader_pin_memory=False,
            learning_rate=1e-5,
            **rl_fields,
        )
        trainer = Trainer(
            model=model,
            **extra,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[StepProbe()],
        )
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"records": records, "losses": losses}


def run_worker(kind: str, trainer_name: str, case_name: str, steps: int, device_type: str) -> dict:
    command = [sys.executable, __file__, "--worker", trainer_name, "--case", case_name]
    command += ["--kind", kind, "--steps", str(steps), "--device", device_type]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{trainer_name} worker failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def summary(result: dict, warmup: int) -> tuple[float, int]:
    kept = result["records"][warmup:]
    return statistics.median(r["seconds"] for r in kept), max(r["peak"] for r in kept)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=list(KINDS), default="dpo")
    parser.add_argument("--case", choices=list(CASES), action="append")
    parser.add_argument("--steps", type=int, default=None, help="default: 12 tiny, 6 vocab128k")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worker", choices=TRAINERS, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.worker:
        case_name = options.case[0]
        print(
            json.dumps(
                worker(options.kind, options.worker, case_name, options.steps, options.device)
            )
        )
        return 0

    from lenalign.bench import machine_description

    print(json.dumps(machine_description(torch.device(options.device))))
    trainer_class = KINDS[options.kind][1]
    labels = [trainer_class, f"Lenalign{trainer_class}"]
    header = (
        f"| case | trainer | median s / step | peak MiB / step | vs {labels[0]} (time, memory) |"
    )
    lines = [header, "| --- | --- | --- | --- | --- |"]
    for case_name in options.case or list(CASES):
        steps = options.steps or (12 if case_name == "tiny" else 6)
        results = {
            name: run_worker(options.kind, name, case_name, steps, options.device)
            for name in TRAINERS
        }
        # both ran the same steps on the same data: their losses must agree
        for theirs, ours in zip(
            results["trl"]["losses"], results["lenalign"]["losses"], strict=True
        ):
            # GRPO's and RLOO's losses are near 0 at a ratio of 1 (their advantages
            # average to 0): an absolute floor
            if not math.isclose(theirs, ours, rel_tol=1e-3, abs_tol=1e-6):
                raise RuntimeError(f"{case_name}: losses differ, trl {theirs} lenalign {ours}")
        base_time, base_peak = summary(results["trl"], options.warmup)
        for name in TRAINERS:
            seconds, peak = summary(results[name], options.warmup)
            ratio = f"{seconds / base_time:.2f}x, {peak / max(base_peak, 1):.2f}x"
            label = labels[TRAINERS.index(name)]
            lines.append(
                f"| {case_name} | {label} | {seconds:.3f} | {peak / 2**20:.1f} | {ratio} |"
            )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
