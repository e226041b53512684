"""engine.distributed: DistributedDataParallel with 2 gloo processes on the CPU matches one process."""

import math
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from lotus_kernels.recipe.engine import TrainConfig, build_model, train

from tiny_runs import TINY, assert_same_state, read_metrics, without_timing

DDP_CONFIG = dict(TINY, epochs=1, drop_path=0.0, mixup=0.0, cutmix=0.0, augment=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, base: str, port: int) -> None:
    # What torchrun would set.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes on two cores
    out = Path(base) / ("run" if rank == 0 else "run_as_seen_by_rank1")
    result = train(TrainConfig(**DDP_CONFIG), out)
    torch.save({"state": result.model.state_dict(), "history": result.history}, Path(base) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_two_gloo_processes_match_single_process(tmp_path):
    single = train(TrainConfig(**DDP_CONFIG), tmp_path / "single")

    mp.spawn(_ddp_worker, args=(str(tmp_path), _free_port()), nprocs=2, join=True)

    # Only rank 0 wrote the run; rank 1 (given its own out_dir here, to tell) wrote nothing.
    assert not (tmp_path / "run_as_seen_by_rank1").exists()
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"config.json", "metrics.jsonl", "checkpoints"}
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # DDP applies the same averaged gradient on both ranks: identical weights, identical reduced metrics.
    assert_same_state(r0["state"], r1["state"])
    assert without_timing(r0["history"]) == without_timing(r1["history"])
    assert without_timing(read_metrics(tmp_path / "run")) == without_timing(r0["history"])

    # Against one process with the same global batch: each rank's 32 samples
    # are exactly half of the single run's 64, so only the float summation
    # order differs (two half-batch means averaged by DDP vs one mean, and
    # matmuls over 32 vs 64 rows). Over 8 AdamW steps that leaves ~1e-6-size
    # differences, while every weight moves ~lr * steps = 8e-3; atol 1e-4 is
    # >10x the observed difference and <2% of the training movement.
    ddp, ref = r0["state"], single.model.state_dict()
    worst = max((ddp[k] - ref[k]).abs().max().item() for k in ref if ref[k].is_floating_point())
    assert worst < 1e-4, worst
    moved = (ref["blocks.0.attn.qkv.weight"] - single_initial_qkv(tmp_path)).abs().max().item()
    assert moved > 50 * worst
    # Evaluation is sharded without padding and summed: every test image counted once.
    h_single, h_ddp = single.history[0], r0["history"][0]
    assert math.isclose(h_ddp["test_loss"], h_single["test_loss"], rel_tol=1e-4)
    assert abs(h_ddp["test_acc"] - h_single["test_acc"]) <= 2 / 256
    assert math.isclose(h_ddp["train_loss"], h_single["train_loss"], rel_tol=1e-4)


def single_initial_qkv(tmp_path):
    """The single-process run's initial qkv weight (train seeds with config.seed, then builds)."""
    torch.manual_seed(DDP_CONFIG.get("seed", 0))
    return build_model(TrainConfig(**DDP_CONFIG), 10).blocks[0].attn.qkv.weight.detach()
