"""Multi-process training (DDP over gloo, 2 CPU processes): 2 ranks == 1 rank with the same global batch.

`data.batch_size` is the global batch, so "2 ranks x 2 clips" and "1 rank x 4 clips" are the same
config. The stages draw every random tensor for the global batch and keep their rows
(distributed.BatchShard), so after a few steps the weights agree to float tolerance.
"""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from data_tools.shards import ClipDataset, ResumableSampler, read_manifest
from distill_toys import dit_checkpoint, random_dit
from synthetic import make_autoencoder_checkpoint, make_data_dir, tiny_config
from worldmodel.checkpoint import load_training_state, read_tensors
from worldmodel.training import distributed
from worldmodel.training.distributed import BatchShard
from worldmodel.training.loop import batch_stream, local_batch_size, train
from worldmodel.training.registry import build_stage

STEPS = 3


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    d = make_data_dir(root / "data", episodes=3, heldout=1, frames=24)
    stats = read_manifest(d)["pose_stats"]
    cfg = tiny_config()
    ae = make_autoencoder_checkpoint(root / "autoencoder", cfg, stats)
    dit = dit_checkpoint(root / "ar", cfg, random_dit(cfg, seed=1), stats, "ar_diffusion")
    return {"data": str(d), "stats": stats, "ae": str(ae), "dit": str(dit), "root": root}


def stage_config(s, name: str):
    over = [f"stage.autoencoder={s['ae']}", f"stage.steps={STEPS}", "stage.log_every=1", "stage.checkpoint_every=2",
            "data.batch_size=4", "optim.warmup_steps=1", "optim.ema_start=1"]
    over.append(f"stage.init={s['dit']}" if name == "ar_diffusion" else f"stage.teacher={s['dit']}")
    return tiny_config(*over)


def run_stage(s, name: str, out, *, resume: bool = False, max_steps: int | None = None) -> dict:
    cfg = stage_config(s, name)
    torch.manual_seed(cfg.seed)  # what the CLI does before building the stage
    stage = build_stage(name, cfg, "cpu", s["stats"])
    return train(stage, ClipDataset(s["data"], cfg.data.clip_frames), cfg, out, resume=resume, max_steps=max_steps)


def _worker(rank: int, world: int, port: int, s: dict, jobs: list) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    _, started = distributed.setup("cpu")  # gloo from torchrun's variables; train() reuses the group
    try:
        for name, out, max_steps in jobs:
            run_stage(s, name, out, max_steps=max_steps)
    finally:
        distributed.teardown(started)


def spawn(s: dict, jobs: list, world: int = 2) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(world, port, s, jobs), nprocs=world, join=True)


def weights(out) -> dict[str, torch.Tensor]:
    st = load_training_state(out / "state.pt")["stage_state"]
    return {f"online.{k}": v for k, v in st["online"].items()} | {f"ema.{k}": v for k, v in st["ema"].items()}


def logged(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a, b) -> None:
    wa, wb = weights(a), weights(b)
    assert set(wa) == set(wb) and not any(k.startswith(("online.module.", "online.net.")) for k in wa)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)
    la, lb = logged(a), logged(b)
    assert [r["step"] for r in la] == [r["step"] for r in lb] == list(range(1, STEPS + 1))  # rank 0 alone wrote
    for ra, rb in zip(la, lb):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4), ra["step"]


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_the_global_batch(setup_dir, tmp_path):
    s = setup_dir
    jobs = [("ar_diffusion", tmp_path / "ar2", None), ("causal_cd", tmp_path / "cd2", None),
            ("ar_diffusion", tmp_path / "cut", 2)]  # interrupted at step 2, resumed below on 1 rank
    spawn(s, jobs)
    run_stage(s, "ar_diffusion", tmp_path / "ar1")
    run_stage(s, "causal_cd", tmp_path / "cd1")
    one_rank = weights(tmp_path / "ar1")
    start = read_tensors(s["dit"])  # weights moved: the comparison is not between two copies of the init
    assert max((one_rank[f"online.{k}"] - v.float()).abs().max().item() for k, v in start.items()) > 1e-3
    assert load_training_state(tmp_path / "cut" / "state.pt")["step"] == 2
    assert_same_run(tmp_path / "ar2", tmp_path / "ar1")
    assert_same_run(tmp_path / "cd2", tmp_path / "cd1")
    # Resume across a change of world size: 2 ranks -> 1 rank continues the same run.
    summary = run_stage(s, "ar_diffusion", tmp_path / "cut", resume=True)
    assert summary["step"] == STEPS
    for k, v in weights(tmp_path / "cut").items():
        torch.testing.assert_close(v, one_rank[k], rtol=1e-4, atol=1e-5, msg=k)


def test_ranks_split_each_global_batch_without_duplicates():
    """15 clips, global batch 4 on 1 and 2 ranks: the same clips per step, none twice in an epoch
    (the sampler pads to a multiple of the world size; the loop never reaches the padding)."""
    n, global_batch, steps = 15, 4, 9  # 3 batches per epoch: 9 steps cross two epoch boundaries
    per_world = {}
    for world in (1, 2):
        batch = local_batch_size(global_batch, world)
        streams = []
        for rank in range(world):
            sampler = ResumableSampler(n, seed=3, rank=rank, world_size=world)
            loader = DataLoader(list(range(n)), batch_size=batch, sampler=sampler, drop_last=True)
            stream = batch_stream(loader, sampler, 0, n // global_batch, batch)
            streams.append([next(stream).tolist() for _ in range(steps)])
        # Global row i * world + r is rank r's row i (what BatchShard assumes).
        per_world[world] = [[streams[i % world][k][i // world] for i in range(global_batch)] for k in range(steps)]
    assert per_world[1] == per_world[2]
    for epoch in range(3):
        seen = sum(per_world[2][3 * epoch : 3 * epoch + 3], [])
        assert len(seen) == len(set(seen)) == 12
    with pytest.raises(ValueError, match="data.batch_size=4 is the global batch"):
        local_batch_size(4, 3)


def test_batch_shard_keeps_this_ranks_rows_of_the_global_draw():
    torch.manual_seed(5)
    full = torch.randn(6, 3)
    rows = []
    for rank in range(2):
        torch.manual_seed(5)
        rows.append(BatchShard(rank, 2).randn_like(torch.zeros(3, 3)))
    torch.testing.assert_close(torch.stack(rows, 1).flatten(0, 1), full)  # interleaved back = the global draw
    torch.manual_seed(5)
    torch.testing.assert_close(BatchShard().randn_like(torch.zeros(6, 3)), full)  # one process: unchanged
    assert [BatchShard(r, 3).global_rows(7) for r in range(3)] == [3, 2, 2]
