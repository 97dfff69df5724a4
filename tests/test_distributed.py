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


def stage_config(s, name: str, out, *extra: str):
    over = [f"stage.autoencoder={s['ae']}", f"stage.steps={STEPS}", "stage.log_every=1", "stage.checkpoint_every=2",
            "data.batch_size=4", "optim.warmup_steps=1", "optim.ema_start=1", f"stage.ode_pairs_dir={out}/ode_pairs",
            "stage.ode_samples=6", "stage.critic_steps=1"]
    over += {"ar_diffusion": [f"stage.init={s['dit']}"], "dmd": [f"stage.init={s['dit']}", f"stage.teacher={s['dit']}"]
             }.get(name, [f"stage.teacher={s['dit']}"])
    return tiny_config(*over, *extra)


def run_stage(s, name: str, out, *extra: str, resume: bool = False, max_steps: int | None = None) -> dict:
    cfg = stage_config(s, name, out, *extra)
    torch.manual_seed(cfg.seed)  # what the CLI does before building the stage
    stage = build_stage(name, cfg, "cpu", s["stats"])
    return train(stage, ClipDataset(s["data"], cfg.data.clip_frames), cfg, out, resume=resume, max_steps=max_steps)


def _worker(rank: int, world: int, port: int, s: dict, jobs: list) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    _, started = distributed.setup("cpu")  # gloo from torchrun's variables; train() reuses the group
    try:
        for name, out, max_steps, *extra in jobs:
            run_stage(s, name, out, *extra, max_steps=max_steps)
    finally:
        distributed.teardown(started)


def spawn(s: dict, jobs: list, world: int = 2) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(world, port, s, jobs), nprocs=world, join=True)


def weights(out) -> dict[str, torch.Tensor]:
    """online, ema (and the DMD critic) from state.pt, under their module names."""
    st = load_training_state(out / "state.pt")["stage_state"]
    return {f"{m}.{k}": v for m in ("online", "ema", "critic") if m in st for k, v in st[m].items()}


def logged(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a, b, atol: float = 1e-5) -> None:
    wa, wb = weights(a), weights(b)
    assert set(wa) == set(wb) and not any(".module." in k or ".net." in k for k in wa)  # saved unwrapped
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=atol, msg=lambda m: f"{a.name} {k}: {m}")
    la, lb = logged(a), logged(b)
    assert [r["step"] for r in la] == [r["step"] for r in lb] == list(range(1, STEPS + 1))  # rank 0 alone wrote
    for ra, rb in zip(la, lb):
        assert set(ra) == set(rb)
        for k in ra:
            if k not in ("elapsed", "samples_per_s", "gpu_s", "ode_gen_s", "ode_bytes"):
                assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), (ra["step"], k)


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_the_global_batch(setup_dir, tmp_path):
    """DDP for every latent distillation stage and AR diffusion, FSDP (stage.fsdp=true) for AR diffusion and
    Causal CD (whose sharded EMA is also called, as the target network): the same weights, EMA, critic and
    logged metrics as one process; a 2-process run (DDP or FSDP) resumes in one process. One spawn for all
    (starting the processes costs more than the runs)."""
    s = setup_dir
    names = ("ar_diffusion", "causal_cd", "causal_ode", "dmd")
    fsdp = ("ar_diffusion", "causal_cd")
    jobs = [(name, tmp_path / f"{name}2", None) for name in names]
    jobs += [(name, tmp_path / f"{name}2_fsdp", None, "stage.fsdp=true") for name in fsdp]
    jobs += [("ar_diffusion", tmp_path / "cut", 2), ("ar_diffusion", tmp_path / "cut_fsdp", 2, "stage.fsdp=true")]
    spawn(s, jobs)  # the "cut" runs stop at step 2 and are resumed below in one process
    for name in names:
        run_stage(s, name, tmp_path / f"{name}1")
        # DMD's generator gradients are ~1e-6 per element, where Adam's normalisation turns summation-order
        # differences into ~1% of one lr step (seen on a single bias): a looser absolute tolerance there.
        assert_same_run(tmp_path / f"{name}2", tmp_path / f"{name}1", atol=1e-4 if name == "dmd" else 1e-5)
    for name in fsdp:
        assert_same_run(tmp_path / f"{name}2_fsdp", tmp_path / f"{name}1")
    one_rank = weights(tmp_path / "ar_diffusion1")
    start = read_tensors(s["dit"])  # weights moved: the comparison is not between two copies of the init
    assert max((one_rank[f"online.{k}"] - v.float()).abs().max().item() for k, v in start.items()) > 1e-3
    # Causal ODE: stage.ode_samples=6 counts over ranks; each rank stored its rows, tagged globally.
    chunks = sorted((tmp_path / "causal_ode2" / "ode_pairs").glob("*.pt"))
    rows = [load_training_state(f)["rows"].tolist() for f in chunks]
    assert sorted(sum(rows, [])) == list(range(6)) and len(rows) == 4
    # Resume across a change of world size: 2 ranks -> 1 rank continues the same run.
    for cut in ("cut", "cut_fsdp"):
        assert load_training_state(tmp_path / cut / "state.pt")["step"] == 2
        summary = run_stage(s, "ar_diffusion", tmp_path / cut, resume=True)
        assert summary["step"] == STEPS
        for k, v in weights(tmp_path / cut).items():
            torch.testing.assert_close(v, one_rank[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{cut} {k}: {m}")


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

