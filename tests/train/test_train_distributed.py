"""``lenalign train`` under torchrun: 2 CPU processes (gloo on 127.0.0.1), the embedded task.

Each launch is ``python -m torch.distributed.run --nproc-per-node 2`` of torchrun_run.py,
which runs ``lenalign.cli train`` in each rank, several runs in turn (a launch's imports
cost most of its time), and SIGKILLs a rank where asked. Ranks other than 0 fail on any
write under the test's directory, so a launch that succeeds is one where rank 0 alone
wrote. The truth is the single-process run of the same global batch, in this process:
each rank scores half of every micro-batch and both DDP and FSDP2 average the gradients,
so the loss curve and the final weights agree within float32 rounding.

Two launches. The first: the four modes (ddp and fsdp, logits and fused head), an FSDP2
resume, and a run whose rank 0 is SIGKILLed writing a checkpoint, which ends the launch.
The second: that run resumed with ``--resume latest``, then a run whose rank 1 dies in
the middle of a step, which ends it.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from distributed_helpers import free_port, run_bounded, torchrun_command
from safetensors.torch import load_file

from lenalign.train import train
from lenalign.train.checkpoint import checkpoint_problem
from lenalign.train.cli import config_from_args
from lenalign.train.config import TrainConfig
from lenalign.train.parallel import TORCHRUN_VARIABLES, World, world_of

WORLD = 2
STEPS = 6
MICRO_BATCHES = 2
RUN = [
    *("--synthetic-size", "64", "--eval-size", "4", "--generate-size", "2"),
    *("--max-new-tokens", "4", "--batch-size", "4", "--max-length", "64"),
    *("--max-prompt-length", "32", "--gradient-accumulation-steps", str(MICRO_BATCHES)),
    *("--max-steps", str(STEPS), "--warmup-steps", "2", "--logging-steps", "1"),
    *("--eval-steps", "3", "--save-steps", "2", "--no-progress"),
]
# the modes, and the single-process run each must equal
CASES = {
    "ddp": (["--distributed", "ddp"], "logits"),
    "ddp-fused": (
        ["--distributed", "ddp", "--fused-head", "--precompute-ref"],
        "fused-precomputed",
    ),
    "fsdp": (["--distributed", "fsdp"], "logits"),
    "fsdp-fused": (["--distributed", "fsdp", "--fused-head"], "fused"),
}
SINGLE = {"logits": [], "fused-precomputed": ["--fused-head", "--precompute-ref"]}
SINGLE["fused"] = ["--fused-head"]
# a collective that waits longer fails the rank; the launches end long before
COLLECTIVE_TIMEOUT = ["--distributed-timeout", "60"]
# float32, relative to each value; values near 0 (rewards at the first steps, which are
# differences of log-likelihoods) are held to an absolute 1e-6. Measured: every value
# within 1e-6 relative but a reward of 3e-4 (5e-8 off); the weights within 1.6e-6
RELATIVE, ABSOLUTE = 1e-5, 1e-6
SCRIPT = Path(__file__).with_name("torchrun_run.py")
# a launch starts 3 interpreters that import torch and transformers (about 10 s on 2
# busy cores), then trains a few seconds per run
LAUNCH_TIMEOUT_S = 150
WALL_CLOCK = ("tokens_per_second",)


def torchrun(root: Path, runs: list[dict]) -> subprocess.CompletedProcess:
    """Launch torchrun_run.py on WORLD ranks with ``runs``; its output in ``stdout``."""
    plan = root / f"plan-{len(list(root.glob('plan-*')))}.json"
    plan.write_text(json.dumps({"watch": str(root / "runs"), "runs": runs}))
    return run_bounded(torchrun_command(WORLD, str(SCRIPT), str(plan)), LAUNCH_TIMEOUT_S)


def run(root: Path, name: str, flags: list[str], **extra) -> dict:
    """A run of the plan: ``lenalign train`` with RUN, ``flags``, output_dir runs/name."""
    argv = [*RUN, *COLLECTIVE_TIMEOUT, *flags, "--output-dir", str(root / "runs" / name)]
    return {"argv": argv, **extra}


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, Path]:
    """The single-process runs, in this process: name -> output_dir."""
    root = tmp_path_factory.mktemp("single")
    for name, flags in SINGLE.items():
        train(config_from_args([*RUN, *flags, "--output-dir", str(root / name)]))
    return {name: root / name for name in SINGLE}


def shown(completed: subprocess.CompletedProcess) -> str:
    """A launch's output for a failure message: its start and its end."""
    out = completed.stdout
    return out if len(out) < 8000 else f"{out[:3000]}\n...\n{out[-5000:]}"


def done(completed: subprocess.CompletedProcess, runs: int) -> None:
    """Assert that runs 0 .. runs - 1 of a launch returned 0 on every rank."""
    for number in range(runs):
        for rank in range(WORLD):
            marker = f"torchrun_run: run {number} done on rank {rank}"
            assert marker in completed.stdout, shown(completed)


def death_to_end(completed: subprocess.CompletedProcess, ended: float) -> float:
    """Seconds from the kill that torchrun_run.py announced to the launch's end."""
    (line,) = (line for line in completed.stdout.splitlines() if " dies at " in line)
    return ended - float(line.rsplit(" ", 1)[1])


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, dict]:
    """The first launch: the four modes, an FSDP2 run resumed from the fsdp run's
    checkpoint-2, and last a ddp run whose rank 0 dies writing its checkpoint-4; with
    the checkpoint directories that run left, each with what it lacks."""
    root = tmp_path_factory.mktemp("launched")
    runs = [run(root, name, flags) for name, (flags, _) in CASES.items()]
    resume = ["--resume", str(root / "runs" / "fsdp" / "checkpoint-2")]
    runs.append(run(root, "fsdp-resumed", [*CASES["fsdp"][0], *resume]))
    kill = {"rank": 0, "moment": "trainer_state", "step": 4}
    runs.append(run(root, "killed", CASES["ddp"][0], kill=kill))
    for each in runs[1:]:
        each["master_port"] = free_port()
    completed = torchrun(root, runs)
    done(completed, len(runs) - 1)
    # what the kill left, before the second launch resumes from it
    killed = root / "runs" / "killed"
    left = {p.name: checkpoint_problem(p) for p in killed.glob("*checkpoint-*")}
    return root / "runs", completed, left


@pytest.fixture(scope="module")
def relaunched(launched) -> tuple[subprocess.CompletedProcess, float]:
    """The second launch: the killed run resumed with ``--resume latest``, then an fsdp
    run whose rank 1 dies in the middle of step 3; with the seconds the other rank
    outlived it."""
    root = launched[0].parent
    resume = run(root, "killed", [*CASES["ddp"][0], "--resume", "latest"])
    kill = {"rank": 1, "moment": "backward", "step": 3, "micro_batches": MICRO_BATCHES}
    # a collective timeout far above the bound asserted: torchrun stops the other rank
    flags = [*CASES["fsdp"][0], "--distributed-timeout", "600"]
    dying = run(root, "dying", flags, kill=kill, master_port=free_port())
    completed = torchrun(root, [resume, dying])
    ended = time.time()
    done(completed, 1)
    return completed, death_to_end(completed, ended)


def curve(out: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in WALL_CLOCK} for line in lines]


def weights(out: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return load_file(out / f"checkpoint-{step}" / "model.safetensors")


def assert_curves_close(got: list[dict], expected: list[dict]) -> None:
    assert [(r["split"], r["step"]) for r in got] == [(r["split"], r["step"]) for r in expected]
    for line, truth in zip(got, expected, strict=True):
        assert line.keys() == truth.keys()
        for key, value in truth.items():
            if isinstance(value, str):
                assert line[key] == value, (line, key)
            else:
                close = math.isclose(line[key], value, rel_tol=RELATIVE, abs_tol=ABSOLUTE)
                assert close, (line, key, value)


@pytest.mark.parametrize("case", CASES)
def test_the_loss_curve_and_weights_are_the_single_process_ones(launched, single, case):
    truth, out = single[CASES[case][1]], launched[0] / case
    assert_curves_close(curve(out), curve(truth))
    expected = weights(truth)
    assert sorted(weights(out)) == sorted(expected)
    for name, tensor in weights(out).items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-5, msg=name)


def test_only_rank_0_writes(launched):
    # any write of rank 1 under runs/ would have failed the launch (torchrun_run.py);
    # what rank 0 wrote is each run's output once: no line twice, no leftover
    for case in CASES:
        out = launched[0] / case
        assert sorted(p.name for p in out.iterdir()) == [
            "checkpoint-2",
            "checkpoint-4",
            "checkpoint-6",
            "metrics.jsonl",
        ]
        lines = curve(out)
        assert len({(r["split"], r["step"]) for r in lines}) == len(lines) == STEPS + 2
        for step in (2, 4, 6):
            assert checkpoint_problem(out / f"checkpoint-{step}") is None
        state = torch.load(out / "checkpoint-6" / "trainer_state.pt", weights_only=True)
        assert len(state["rng_states"]) == WORLD


WRITE_PROBE = """
import os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch, transformers.modeling_utils
from torchrun_run import refuse_native_saves_under, refuse_writes_under
root = Path(sys.argv[2])
(root / "kept").write_text("x")
sys.addaudithook(refuse_writes_under(str(root), 1))
refuse_native_saves_under(str(root), 1)
tensors = {"x": torch.ones(2)}
attempts = {
    "torch.save": lambda: torch.save(tensors, root / "state.pt"),
    "safe_save_file": lambda: transformers.modeling_utils.safe_save_file(
        tensors, str(root / "model.safetensors")
    ),
    "read": lambda: (root / "kept").read_text(),
    "write": lambda: (root / "new").write_text("x"),
    "append": lambda: open(root / "kept", "a").close(),
    "mkdir": lambda: (root / "dir").mkdir(),
    "replace": lambda: os.replace(root / "kept", root / "moved"),
    "remove": lambda: os.remove(root / "kept"),
    "elsewhere": lambda: (root.parent / "outside").write_text("x"),
}
for name, attempt in attempts.items():
    try:
        attempt()
        print(name, "done")
    except RuntimeError as error:
        print(name, "refused" if "only rank 0 writes" in str(error) else error)
"""


def test_the_write_guard_of_the_other_ranks_refuses_writes(tmp_path):
    # what makes a launch that succeeds one where only rank 0 wrote
    root = tmp_path / "runs"
    root.mkdir()
    command = [sys.executable, "-c", WRITE_PROBE, str(SCRIPT.parent), str(root)]
    probe = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    outcomes = dict(line.split(" ", 1) for line in probe.stdout.splitlines())
    assert outcomes == {
        "torch.save": "refused",
        "safe_save_file": "refused",
        "read": "done",
        "write": "refused",
        "append": "refused",
        "mkdir": "refused",
        "replace": "refused",
        "remove": "refused",
        "elsewhere": "done",
    }


def test_an_fsdp_run_resumes_under_torchrun(launched):
    straight, resumed = launched[0] / "fsdp", launched[0] / "fsdp-resumed"
    # the resumed run's own output_dir had no metrics.jsonl: its lines start after step 2
    assert curve(resumed) == [r for r in curve(straight) if r["step"] > 2]
    for name, tensor in weights(resumed).items():
        assert torch.equal(tensor, weights(straight)[name]), name


def test_a_checkpoint_of_two_fsdp_ranks_resumes_in_one_process(launched, tmp_path):
    # the layout is the single-process one: rank 0's RNG state, the optimizer by position
    straight = launched[0] / "fsdp"
    resume = ["--resume", str(straight / "checkpoint-2"), "--output-dir", str(tmp_path)]
    train(config_from_args([*RUN, *resume]))
    assert_curves_close(curve(tmp_path), [r for r in curve(straight) if r["step"] > 2])
    for name, tensor in weights(tmp_path).items():
        torch.testing.assert_close(tensor, weights(straight)[name], rtol=1e-5, atol=1e-5)


def test_a_run_killed_mid_checkpoint_resumes_as_if_never_stopped(launched, relaunched):
    runs, first, left = launched
    # the kill came where intended: torchrun reports rank 0's SIGKILL, and the run left
    # checkpoint-2 and the partial write of checkpoint-4 (no train_config.json yet)
    assert first.returncode != 0
    assert "SIGKILL" in first.stdout and "rank      : 0" in first.stdout, shown(first)
    (partial,) = (name for name in left if name.startswith(".checkpoint-4.partial-"))
    assert left == {"checkpoint-2": None, partial: "no train_config.json"}
    out, straight = runs / "killed", runs / "ddp"
    resumed = relaunched[0]
    assert re.search(r"passing over \S*\.checkpoint-4\.partial-\d+: an unfinished", resumed.stdout)
    assert curve(out) == curve(straight)
    for name, tensor in weights(out).items():
        assert torch.equal(tensor, weights(straight)[name]), name
    # the resumed run's first save cleared the leftover
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in straight.iterdir())


def test_a_rank_dying_mid_step_stops_the_launch(launched, relaunched):
    completed, seconds = relaunched
    assert completed.returncode != 0
    # torchrun's report names the rank and the signal
    report = completed.stdout[completed.stdout.index("Root Cause") :]
    assert "rank      : 1" in report and "SIGKILL" in report, report
    assert seconds < 60, shown(completed)
    out = launched[0] / "dying"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


def test_a_process_group_of_the_caller_is_used_and_kept(tmp_path, monkeypatch, single):
    # one rank, in this process: its group made here, as a script around train() would
    torchrun = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for name, value in (torchrun | {"MASTER_PORT": str(free_port())}).items():
        monkeypatch.setenv(name, value)
    store = f"file://{tmp_path / 'store'}"
    torch.distributed.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        for mode in ("ddp", "fsdp"):
            out = tmp_path / mode
            argv = [*RUN, "--distributed", mode, "--fused-head", "--output-dir", str(out)]
            assert train(config_from_args(argv)).step == STEPS
            assert torch.distributed.is_initialized()
            assert_curves_close(curve(out), curve(single["fused"]))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize(
    ("values", "environment", "message"),
    [
        ({"distributed": "xla"}, {}, "distributed: expected one of"),
        ({"distributed_timeout": 0}, {}, "distributed_timeout: expected an integer >= 1"),
        ({"distributed": "ddp"}, {}, "distributed: expected 'ddp' to run under torchrun"),
        ({}, {"WORLD_SIZE": "2"}, "distributed: expected 'ddp' or 'fsdp' in a torchrun"),
        ({"distributed": "fsdp", "batch_size": 3}, "torchrun", "batch_size: expected a multiple"),
        ({"distributed": "ddp", "device": "cuda:1"}, "torchrun", "device: expected auto, cpu"),
    ],
)
def test_bad_distributed_settings_name_the_field(monkeypatch, values, environment, message):
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    if environment == "torchrun":
        environment = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
        environment |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        world_of(TrainConfig(**values))


def test_each_rank_scores_its_own_contiguous_share_of_the_batch():
    indices = list(range(10, 22))
    for size in (1, 2, 3, 4):
        shares = [World("ddp", torch.device("cpu"), r, size).share(indices) for r in range(size)]
        assert [len(share) for share in shares] == [len(indices) // size] * size
        assert [i for share in shares for i in share] == indices  # disjoint, in order, whole
