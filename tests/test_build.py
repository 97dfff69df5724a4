"""worldmodel.build: the whole pipeline in one command on tiny synthetic data (CPU, seconds per test)."""

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from synthetic import make_data_dir
from worldmodel.build import BuildOptions, build, join_parts, main, parse_args, split_large
from worldmodel.build_plan import BuildError, Ledger, split_overrides, stage_configs
from worldmodel.report import loss_curve

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
FAST = ("stage.log_every=1", "stage.checkpoint_every=1000")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("data"), episodes=3, heldout=1, frames=40)


def opts(*overrides, stages=("autoencoder", "teacher", "ar_diffusion", "causal_cd", "dmd"), **kw):
    return BuildOptions(config=TINY, overrides=[*FAST, *overrides], stages=stages, device="cpu",
                        eval_steps=(1,), eval_horizons=(1, 8), eval_episodes=1, starts=2, **kw)


def snapshot(run: Path) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "run"
    summary = build(data, run, opts("stage.steps=4", "dmd.stage.steps=2", "dmd.stage.critic_steps=2"))
    return run, summary


# -- configs ----------------------------------------------------------------------------------------

def test_per_stage_overrides_plan_and_wiring(tmp_path):
    common, per = split_overrides(["stage.steps=5", "autoencoder.latent_channels=4", "dmd.stage.steps=2",
                                   "autoencoder.data.batch_size=2"])
    assert common == ["stage.steps=5", "autoencoder.latent_channels=4"]  # a section, not the stage
    assert per == {"dmd": ["stage.steps=2"], "autoencoder": ["data.batch_size=2"]}
    plan = {"teacher": {"stage": {"steps": 7}}, "dmd": {"stage": {"steps": 9}}}
    three = ("autoencoder", "teacher", "dmd")
    cfgs = stage_configs(TINY, plan, ["stage.steps=5", "dmd.stage.steps=2"], three, tmp_path)
    assert [cfgs[s].stage.steps for s in ("autoencoder", "teacher", "dmd")] == [5, 5, 2]  # CLI beats the plan
    cfgs = stage_configs(TINY, plan, [], ("teacher", "causal_cd", "dmd"), tmp_path)
    assert cfgs["teacher"].stage.steps == 7 and cfgs["dmd"].stage.steps == 9
    assert cfgs["teacher"].stage.autoencoder == str(tmp_path / "autoencoder" / "autoencoder.safetensors")
    assert cfgs["causal_cd"].stage.teacher.endswith("ar_diffusion/ar_diffusion.safetensors")
    assert cfgs["dmd"].stage.teacher.endswith("teacher/teacher.safetensors")
    assert cfgs["dmd"].stage.init.endswith("causal_cd/causal_cd.safetensors")
    cfgs = stage_configs(TINY, {}, [], ("ar_diffusion", "dmd"), tmp_path)  # no few-step init built: AR weights
    assert cfgs["dmd"].stage.init.endswith("ar_diffusion/ar_diffusion.safetensors")
    cfgs = stage_configs(TINY, {}, ["dmd.stage.init=/x/y.safetensors"], ("dmd",), tmp_path)
    assert cfgs["dmd"].stage.init == "/x/y.safetensors"  # an explicit per-stage path wins
    a = parse_args(["d", "--out", "r", "stage.steps=3", "--stages", "autoencoder,teacher", "teacher.stage.steps=2",
                    "--eval-horizons", "1,8"])
    assert a.overrides == ["stage.steps=3", "teacher.stage.steps=2"] and a.stages == ("autoencoder", "teacher")
    assert a.eval_horizons == (1, 8) and a.eval_steps == (1, 2, 4)
    with pytest.raises(BuildError, match="wires stage.init itself.*dmd.stage.init"):
        split_overrides(["stage.init=foo"])
    with pytest.raises(BuildError, match="stage.bogus|unknown key"):
        stage_configs(TINY, {}, ["teacher.stage.bogus=1"], ("teacher",), tmp_path)
    with pytest.raises(BuildError, match=r"not in --stages"):
        stage_configs(TINY, {}, ["dmd.stage.steps=1"], ("teacher",), tmp_path)


# -- the pipeline -----------------------------------------------------------------------------------

def test_end_to_end_world_loads_and_steps(built):
    import gymnasium

    from worldmodel.inference.world import World

    run, summary = built
    assert summary["complete"] and summary["student"] == "dmd"
    assert [r["stage"] for r in summary["ran"]] == ["autoencoder", "teacher", "ar_diffusion", "causal_cd", "dmd"]
    assert all(r["mode"] == "fresh" and r["stopped"] == "done" for r in summary["ran"])
    world = World.load(run / "world")
    prov = world.provenance
    assert prov["student_stage"] == "dmd"
    assert prov["data"]["manifest_sha256"] == Ledger(run).data["data_manifest_sha256"]
    assert {n: s["steps"] for n, s in prov["stages"].items()} == {
        "autoencoder": 4, "teacher": 4, "ar_diffusion": 4, "causal_cd": 4, "dmd": 2}
    assert all(s["gpu_seconds"] > 0 and s["peak_mem"] > 0 for s in prov["stages"].values())
    horizons = prov["eval"]["results"][0]["horizons"]
    assert set(horizons) == {"1", "8"} and "copy_last_psnr" in horizons["1"]
    assert world.start_frames.shape == (2, 2, 32, 48, 3)
    # The student in the world is the DMD export (bf16 both): identical tensors.
    from safetensors.torch import load_file
    a, b = load_file(str(run / "world" / "student.safetensors")), load_file(str(run / "dmd" / "dmd.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    env = gymnasium.make("envs:worldmodel/Doom-v0", world=run / "world", device="cpu", dtype="float32")
    obs, _ = env.reset(seed=0)
    obs, *_ = env.step(1)
    assert obs.shape == (32, 48, 3) and obs.dtype == np.uint8
    env.close()

    report = (run / "report.md").read_text()
    assert "| dmd | 2 / 2 |" in report and "copy-last PSNR" in report and "EMA generator of DMD" in report
    for png in ("loss_curves.png", "sample_strip.png"):
        img = cv2.imread(str(run / png))
        assert img is not None and img.std() > 10, png  # drawn, not blank
    steps, losses = loss_curve(run / "teacher" / "metrics.jsonl", Ledger(run).entry("teacher")["segments"])
    assert list(steps) == [1, 2, 3, 4] and np.isfinite(losses).all()


def test_second_call_redoes_nothing(built, data, capsys):
    run, _ = built
    before = {k: v for k, v in snapshot(run).items() if not k.endswith((".md", ".png"))}
    summary = build(data, run, opts("stage.steps=4", "dmd.stage.steps=2", "dmd.stage.critic_steps=2"))
    assert summary["complete"] and summary["ran"] == []
    assert "is up to date" in capsys.readouterr().out
    after = {k: v for k, v in snapshot(run).items() if not k.endswith((".md", ".png"))}
    assert after == before  # no checkpoint, log, world or ledger rewritten


def test_time_budget_stops_and_next_call_continues(data, tmp_path):
    run = tmp_path / "run"
    two = ("autoencoder", "teacher")
    first = build(data, run, opts("autoencoder.stage.steps=100000", "teacher.stage.steps=3", stages=two,
                                  time_budget=4.0))
    assert not first["complete"] and first["ran"][0]["stopped"] == "time_budget"
    reached = first["stages"]["autoencoder"].step
    assert reached < 100000 and (run / "autoencoder" / "state.pt").is_file()
    assert not (run / "teacher").exists() and not (run / "world").exists()
    # stage.steps may change between calls: finish the autoencoder 3 steps later, then the teacher.
    second = build(data, run, opts(f"autoencoder.stage.steps={reached + 3}", "teacher.stage.steps=3", stages=two))
    ae, teacher = second["ran"]
    assert ae["mode"] == "resume" and ae["trained_steps"] == 3 and teacher["mode"] == "fresh"
    assert second["complete"] and second["student"] is None and not (run / "world").exists()  # no causal student


def test_restart_from_bf16_weights_when_state_is_gone(data, tmp_path):
    run = tmp_path / "run"
    build(data, run, opts("stage.steps=12", stages=("autoencoder",)))
    (run / "autoencoder" / "state.pt").unlink()  # what a GPU lease leaves: the bf16 export only
    summary = build(data, run, opts("stage.steps=20", stages=("autoencoder",)))
    (ran,) = summary["ran"]
    assert ran["mode"] == "warm" and ran["trained_steps"] == 8
    status = summary["stages"]["autoencoder"]
    assert status.step == 20 and status.offset == 12
    segments = Ledger(run).entry("autoencoder")["segments"]
    assert [s["offset"] for s in segments] == [0, 12]
    steps, losses = loss_curve(run / "autoencoder" / "metrics.jsonl", segments)
    assert list(steps) == list(range(1, 21))
    # Continued from the trained weights, not from scratch: the first step after the restart is far below
    # where training began.
    assert losses[12] < losses[0] - 0.5 * (losses[0] - losses[11])
    # A third call with the same target: done.
    assert build(data, run, opts("stage.steps=20", stages=("autoencoder",)))["ran"] == []


def test_bad_input_errors_and_loses_nothing(built, data, tmp_path):
    run, _ = built
    before = snapshot(run)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BuildError, match="manifest missing"):
        build(tmp_path / "empty", tmp_path / "new", opts())
    with pytest.raises(BuildError, match=r"another config.*teacher: dit\.dim: 48 != 64.*dmd: dit\.dim"):
        build(data, run, opts("stage.steps=4", "dit.dim=64"))
    other = shutil.copytree(data, tmp_path / "other")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["episodes"] = manifest["episodes"][1:]
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BuildError, match=r"other/manifest.json .*does not describe the data this run was trained"):
        build(other, run, opts("stage.steps=4"))
    assert main([str(other), "--out", str(run), "--config", str(TINY), "stage.steps=4"]) == 2  # CLI: message, exit 2
    assert snapshot(run) == before


def test_split_and_join_round_trip(tmp_path):
    big = tmp_path / "a" / "x.safetensors"
    big.parent.mkdir()
    payload = np.random.default_rng(0).integers(0, 256, 3 * 2**20 + 5, dtype=np.uint8).tobytes()
    big.write_bytes(payload)
    (tmp_path / "small.safetensors").write_bytes(b"tiny")
    parts = split_large(tmp_path, 1)
    assert [p.name for p in parts] == [f"x.safetensors.part{i:03d}" for i in range(4)]
    assert all(p.stat().st_size <= 2**20 for p in parts)
    assert split_large(tmp_path, 1) == []  # already split: nothing rewritten
    big.unlink()
    world = tmp_path / "world"  # a packaged world reads its parts as they are: not joined
    world.mkdir()
    (world / "world.json").write_text("{}")
    (world / "student.safetensors.part000").write_bytes(b"x")
    assert join_parts(tmp_path) == [big] and big.read_bytes() == payload


def test_rerecorded_data_passes_and_exports_check_without_ledger(built, data, tmp_path):
    run = shutil.copytree(built[0], tmp_path / "run")
    again = shutil.copytree(data, tmp_path / "again")
    manifest = json.loads((again / "manifest.json").read_text())
    manifest["recording"] = {"seconds": 12.5, "workers": 7}  # same seed and episodes, another session
    (again / "manifest.json").write_text(json.dumps(manifest))
    args = ("stage.steps=4", "dmd.stage.steps=2", "dmd.stage.critic_steps=2")
    assert build(again, run, opts(*args))["ran"] == []
    (run / "build.json").unlink()  # only the exports came back: they name the exact manifest file
    with pytest.raises(BuildError, match=r"autoencoder\.json records"):
        build(again, run, opts(*args))
    summary = build(data, run, opts(*args))
    assert summary["ran"] == [] and summary["complete"] and summary["stages"]["dmd"].step == 2


def test_stage_time_limit_counts_as_done_and_a_higher_limit_continues(data, tmp_path, monkeypatch):
    """stage.time_limit caps a stage over calls: it stops near the limit, counts as done (the next stage runs in
    the same call), a second call skips it, and a higher limit resumes it."""
    import worldmodel.build

    monkeypatch.setattr(worldmodel.build, "MIN_STAGE_SECONDS", 0.3)  # what is left of a limit is worth a start
    run = tmp_path / "run"
    two = ("autoencoder", "teacher")
    capped = ("autoencoder.stage.steps=100000", "autoencoder.stage.time_limit=1", "teacher.stage.steps=2")
    first = build(data, run, opts(*capped, stages=two))
    ae, teacher = first["ran"]
    assert ae["stopped"] == "time_limit" and teacher["stopped"] == "done" and first["complete"]
    status = first["stages"]["autoencoder"]
    assert status.mode == "done" and 0 < status.step < 100000 and 0.4 < status.gpu_seconds <= 1 + 0.5
    assert Ledger(run).entry("autoencoder")["time_limit_reached"] == 1
    assert build(data, run, opts(*capped, stages=two))["ran"] == []  # the same limit: nothing to do
    assert build(data, run, opts(*capped, "autoencoder.stage.time_limit=0.5", stages=two))["ran"] == []  # lower
    # Higher: what is left (> MIN_STAGE_SECONDS) continues the stage from its state.pt.
    higher = build(data, run, opts(*capped[:1], "autoencoder.stage.time_limit=2", "teacher.stage.steps=2",
                                   stages=two))
    (more,) = higher["ran"]
    assert more["mode"] == "resume" and more["stopped"] == "time_limit" and more["trained_steps"] > 0
    assert status.gpu_seconds + 0.3 < higher["stages"]["autoencoder"].gpu_seconds <= 2 + 0.5


def test_no_package_trains_only_and_a_later_call_packages_without_training(data, tmp_path):
    """--no-package (the GPU lease) leaves no world; the next call (the CPU, same data) packages it as is."""
    run = tmp_path / "run"
    few = ("stage.steps=2", "dmd.stage.critic_steps=1")
    first = build(data, run, opts(*few, package=False))
    assert first["complete"] and first["world"] is None and not (run / "world").exists()
    steps = {n: s.step for n, s in first["stages"].items()}
    second = build(data, run, opts(*few))
    assert second["ran"] == [] and second["world"] == str(run / "world")
    assert {n: s.step for n, s in second["stages"].items()} == steps
    assert (run / "world" / "world.json").is_file()
    assert parse_args(["d", "--out", "r", "--no-package"]).no_package
