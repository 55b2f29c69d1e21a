"""DDP: two CPU processes train either model exactly like one on the same global batch, evaluation runs to the
end on more ranks than batches, and ``configs/trainer/multinode.yaml`` builds the strategy that torchrun
and SLURM launches need."""

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from ddp_run import MODELS
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch import LightningDataModule
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_transformer import Seq2SeqTransformer
from lightning_transformer.cli import TransformerCLI

SCRIPT = Path(__file__).with_name("ddp_run.py")
EVAL_SCRIPT = Path(__file__).with_name("ddp_eval_run.py")
CORPUS = Path(__file__).resolve().parents[1] / "lightning_transformer" / "data" / "corpus"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: The paper's base run on 2 nodes x 8 GPUs, as the README composes it.
MULTINODE = [CONFIGS / "trainer/paper.yaml", CONFIGS / "model/base.yaml", CONFIGS / "data/wmt14_en_de.yaml",
             CONFIGS / "trainer/multinode.yaml"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(tmp_path: Path, name: str, *args: str) -> dict:
    output = tmp_path / f"{name}.pt"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--init", str(tmp_path / "init.pt"), "--output", str(output),
                             *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(output)


def run_ranks(command: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run a DDP script; on a hang, kill every rank it launched (they share its session) and fail."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"the ranks hung for {timeout} s:\n{stderr[-3000:]}")
    assert process.returncode == 0, stderr[-3000:]
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def max_parameter_difference(first: dict, second: dict) -> float:
    return max((first[name] - second[name]).abs().max().item() for name in first)


@pytest.fixture(scope="module", params=tuple(MODELS))
def runs(request, tmp_path_factory):
    """Every run of a model (``seq2seq``, or ``lm``: decoder-only) starts from the same weights, saved once here."""
    tmp_path = tmp_path_factory.mktemp(f"ddp-{request.param}")
    model_class, config = MODELS[request.param]
    torch.manual_seed(0)
    initial = model_class(**config).state_dict()
    torch.save(initial, tmp_path / "init.pt")
    runs = {name: train(tmp_path, name, "--model", request.param, *args) for name, args in (
        ("one", ("--devices", "1")),
        ("two", ("--devices", "2")),
        ("two_per_rank_mean", ("--devices", "2", "--per-rank-mean")),
    )}
    runs["initial"] = {"state_dict": initial}
    return runs


def test_two_processes_match_one_process_on_the_same_global_batch(runs):
    one, two = runs["one"], runs["two"]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    # The global, token-weighted loss of every step, and the weights after 5 clipped Adam steps.
    assert torch.allclose(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=0, atol=1e-6)
    assert max_parameter_difference(two["state_dict"], one["state_dict"]) < 1e-6
    assert max_parameter_difference(one["state_dict"], runs["initial"]["state_dict"]) > 0.05  # the weights did move


def test_training_steps_wait_at_no_barrier(runs):
    # RecordLosses reduces (behind barriers) after CountBarriers stops counting.
    assert runs["two"]["barriers_in_steps"] == 0


def test_averaging_per_rank_means_would_miss_by_far_more_than_the_tolerance(runs):
    # Rank 0 holds 5x the target tokens of rank 1, so weighing the ranks equally is visibly wrong.
    one, per_rank_mean = runs["one"], runs["two_per_rank_mean"]
    reported = torch.tensor(runs["two"]["rank_mean_losses"])
    assert (reported - torch.tensor(one["losses"])).abs().max() > 0.1
    assert max_parameter_difference(per_rank_mean["state_dict"], one["state_dict"]) > 0.01


def test_ranks_that_timed_bf16_differently_all_take_rank_zeros_precision(tmp_path):
    torch.manual_seed(0)
    torch.save(Seq2SeqTransformer(**MODELS["seq2seq"][1]).state_dict(), tmp_path / "init.pt")
    plain = train(tmp_path, "plain", "--devices", "2")
    split = train(tmp_path, "split", "--devices", "2", "--bf16-faster-by-rank", "no,yes")
    assert split["losses"] == plain["losses"]  # both ranks trained in float32, as rank 0 measured


def test_bf16_master_weights_under_ddp_follow_one_process(tmp_path):
    torch.manual_seed(0)
    initial = Seq2SeqTransformer(**MODELS["seq2seq"][1]).state_dict()
    torch.save(initial, tmp_path / "init.pt")
    one, two = (train(tmp_path, f"master{n}", "--devices", str(n), "--master-weights") for n in (1, 2))
    assert all(weight.dtype == torch.float32 for weight in two["state_dict"].values())  # the masters
    rank1 = torch.load(tmp_path / "master2.pt.rank1")
    assert max_parameter_difference(rank1, two["state_dict"]) == 0.0  # the ranks step identical masters
    # bf16 sums the two ranks' gradients in another order than one process: equal to bf16's resolution.
    assert torch.allclose(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=0, atol=2e-2)
    flat = {name: torch.cat([run[k].flatten() for k in sorted(run)]) for name, run in
            (("one", one["state_dict"]), ("two", two["state_dict"]), ("initial", initial))}
    moved = (flat["one"] - flat["initial"]).norm()
    assert moved > 1.0 and (flat["two"] - flat["one"]).norm() < 0.1 * moved  # measured: 0.037


def test_evaluation_and_prediction_finish_on_more_ranks_than_evaluation_batches(tmp_path):
    """4 ranks, a 3-pair validation split in one batch: fit with sanity validation and BLEU, validate
    with BLEU and predict all end, and every sentence counts exactly once."""
    with gzip.open(CORPUS / "train.tsv.gz", "rt", encoding="utf-8") as handle:
        lines = [next(handle) for _ in range(404)]
    (tmp_path / "train.tsv").write_text("".join(lines[:401]), encoding="utf-8")
    (tmp_path / "validation.tsv").write_text(lines[0] + "".join(lines[401:]), encoding="utf-8")
    output, predictions = tmp_path / "result.json", tmp_path / "predictions.txt"
    run_ranks([sys.executable, str(EVAL_SCRIPT), "--devices", "4", "--data", str(tmp_path), "--cache",
               str(tmp_path / "cache"), "--output", str(output), "--predictions", str(predictions)], tmp_path, 240)
    result = json.loads(output.read_text())
    assert (result["world_size"], result["split_size"], result["split_batches"]) == (4, 3, 1)
    assert result["fit_bleu_sentences"] == result["validate_bleu_sentences"] == 3
    assert result["val_loss"] == pytest.approx(result["whole_split_loss"], abs=1e-5)
    assert len(predictions.read_text(encoding="utf-8").splitlines()) == 3


# What `torchrun --nnodes 2 --nproc-per-node 8` gives the 4th process of the second node, and what
# `srun` gives the same task under `sbatch --nodes 2 --ntasks-per-node 8`.
TORCHRUN = dict(TORCHELASTIC_RUN_ID="nmt", WORLD_SIZE="16", RANK="11", LOCAL_RANK="3", GROUP_RANK="1",
                LOCAL_WORLD_SIZE="8", MASTER_ADDR="node0", MASTER_PORT="29500")
SLURM = dict(SLURM_NTASKS="16", SLURM_PROCID="11", SLURM_LOCALID="3", SLURM_NODEID="1", SLURM_NNODES="2",
             SLURM_NTASKS_PER_NODE="8", SLURM_JOB_NAME="nmt", SLURM_JOB_ID="4242", SLURM_NODELIST="gpu[07-08]")


def multinode_trainer(monkeypatch, tmp_path, env: dict):
    """The Trainer the composed multinode run (:data:`MULTINODE`) builds under ``env``,
    on CPU because this machine has no GPU; nothing is launched."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-transformer"])
    # Cleared so that monkeypatch also undoes what Lightning writes into os.environ (seed, MASTER_ADDR/PORT).
    for name in {*TORCHRUN, *SLURM, "PL_GLOBAL_SEED", "PL_SEED_WORKERS"}:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # The Trainer makes this process rank 11, which would silence every later rank-zero warning.
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    with torch.device("meta"):  # the base model's weights are not needed
        cli = TransformerCLI(Seq2SeqTransformer, LightningDataModule, subclass_mode_model=True,
                             subclass_mode_data=True, run=False,
                             args=[*(arg for path in MULTINODE for arg in ("--config", str(path))),
                                   "--trainer.accelerator", "cpu"])
    return cli.trainer


def test_multinode_config_asks_for_ddp_on_two_nodes_of_eight_gpus():
    trainer = {}
    for path in MULTINODE:
        trainer.update(yaml.safe_load(path.read_text()).get("trainer", {}))
    assert (trainer["accelerator"], trainer["strategy"], trainer["precision"]) == ("gpu", "ddp", "bf16-mixed")
    assert (trainer["num_nodes"], trainer["devices"]) == (2, 8)


@pytest.mark.parametrize("env, environment", [(TORCHRUN, TorchElasticEnvironment), (SLURM, SLURMEnvironment)],
                         ids=["torchrun", "slurm"])
def test_multinode_config_builds_ddp_with_the_launchers_ranks(env, environment, monkeypatch, tmp_path):
    trainer = multinode_trainer(monkeypatch, tmp_path, env)
    assert isinstance(trainer.strategy, DDPStrategy)
    assert isinstance(trainer.strategy.cluster_environment, environment)
    assert (trainer.num_nodes, trainer.num_devices, trainer.world_size) == (2, 8, 16)
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank) == (11, 3, 1)
    assert trainer.precision == "bf16-mixed"
    assert {"TrainingDoctor", "LearningRateMonitor", "TokenThroughput"} <= {type(c).__name__ for c in trainer.callbacks}
    assert trainer.strategy.cluster_environment.main_address == ("node0" if env is TORCHRUN else "gpu07")
