"""DDP: two CPU processes train exactly like one on the same global batch, and
``configs/multinode.yaml`` builds the strategy that torchrun and SLURM launches need."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from ddp_run import MODEL
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch import LightningDataModule
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_transformer import Seq2SeqTransformer
from lightning_transformer.cli import TransformerCLI

SCRIPT = Path(__file__).with_name("ddp_run.py")
MULTINODE = Path(__file__).resolve().parents[1] / "configs" / "multinode.yaml"


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


def max_parameter_difference(first: dict, second: dict) -> float:
    return max((first[name] - second[name]).abs().max().item() for name in first)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run starts from the same weights, saved once here."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    torch.manual_seed(0)
    initial = Seq2SeqTransformer(**MODEL).state_dict()
    torch.save(initial, tmp_path / "init.pt")
    runs = {name: train(tmp_path, name, *args) for name, args in (
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


def test_averaging_per_rank_means_would_miss_by_far_more_than_the_tolerance(runs):
    # Rank 0 holds 5x the target tokens of rank 1, so weighing the ranks equally is visibly wrong.
    one, per_rank_mean = runs["one"], runs["two_per_rank_mean"]
    reported = torch.tensor(runs["two"]["rank_mean_losses"])
    assert (reported - torch.tensor(one["losses"])).abs().max() > 0.1
    assert max_parameter_difference(per_rank_mean["state_dict"], one["state_dict"]) > 0.01


# What `torchrun --nnodes 2 --nproc-per-node 8` gives the 4th process of the second node, and what
# `srun` gives the same task under `sbatch --nodes 2 --ntasks-per-node 8`.
TORCHRUN = dict(TORCHELASTIC_RUN_ID="nmt", WORLD_SIZE="16", RANK="11", LOCAL_RANK="3", GROUP_RANK="1",
                LOCAL_WORLD_SIZE="8", MASTER_ADDR="node0", MASTER_PORT="29500")
SLURM = dict(SLURM_NTASKS="16", SLURM_PROCID="11", SLURM_LOCALID="3", SLURM_NODEID="1", SLURM_NNODES="2",
             SLURM_NTASKS_PER_NODE="8", SLURM_JOB_NAME="nmt", SLURM_JOB_ID="4242", SLURM_NODELIST="gpu[07-08]")


def multinode_trainer(monkeypatch, tmp_path, env: dict):
    """The Trainer `lightning-transformer fit --config configs/multinode.yaml` builds under ``env``,
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
                             args=["--config", str(MULTINODE), "--trainer.accelerator", "cpu"])
    return cli.trainer


def test_multinode_config_asks_for_ddp_on_two_nodes_of_eight_gpus():
    trainer = yaml.safe_load(MULTINODE.read_text())["trainer"]
    assert (trainer["accelerator"], trainer["strategy"], trainer["precision"]) == ("gpu", "ddp", "bf16-mixed")
    assert (trainer["num_nodes"], trainer["devices"], trainer["use_distributed_sampler"]) == (2, 8, False)


@pytest.mark.parametrize("env, environment", [(TORCHRUN, TorchElasticEnvironment), (SLURM, SLURMEnvironment)],
                         ids=["torchrun", "slurm"])
def test_multinode_config_builds_ddp_with_the_launchers_ranks(env, environment, monkeypatch, tmp_path):
    trainer = multinode_trainer(monkeypatch, tmp_path, env)
    assert isinstance(trainer.strategy, DDPStrategy)
    assert isinstance(trainer.strategy.cluster_environment, environment)
    assert (trainer.num_nodes, trainer.num_devices, trainer.world_size) == (2, 8, 16)
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank) == (11, 3, 1)
    assert trainer.precision == "bf16-mixed"
    assert trainer.strategy.cluster_environment.main_address == ("node0" if env is TORCHRUN else "gpu07")
