"""Fidelity evaluation on tiny data: the table has every horizon with the copy-last baseline beside it."""

import json

import numpy as np
import pytest
import torch

from data_tools.shards import ClipDataset, read_manifest
from synthetic import make_autoencoder_checkpoint, make_data_dir, tiny_config
from worldmodel.eval import main as eval_main
from worldmodel.eval import score
from worldmodel.metrics import psnr, ssim
from worldmodel.training.loop import train
from worldmodel.training.registry import build_stage


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = make_data_dir(tmp_path_factory.mktemp("data"), episodes=4, heldout=2, frames=24)
    stats = read_manifest(d)["pose_stats"]
    root = tmp_path_factory.mktemp("runs")
    ae = make_autoencoder_checkpoint(root / "autoencoder", tiny_config(), stats)
    over = [f"stage.autoencoder={ae}", "stage.steps=3"]
    cfg = tiny_config(*over)
    train(build_stage("teacher", cfg, "cpu", stats), ClipDataset(d, 4), cfg, root / "teacher")
    cfg = tiny_config(*over, f"stage.init={root / 'teacher' / 'teacher.safetensors'}")
    train(build_stage("ar_diffusion", cfg, "cpu", stats), ClipDataset(d, 4), cfg, root / "ar")
    return d, ae, root


def test_metrics_sanity():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.isinf(psnr(x, x)).all() and torch.allclose(ssim(x, x), torch.ones(2))
    y = (x + 0.1).clamp(-1, 1)
    assert 20 < psnr(x, y).mean() < 30 and ssim(x, y).mean() < 1
    assert ssim(x, -x).mean() < 0.1 < ssim(x, y).mean()


def test_score_puts_copy_last_beside_the_model():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 256, (2, 5, 16, 16, 3), dtype=np.uint8)
    last = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    res = score(truth, truth, truth, last, [1, 4, 8])
    assert set(res) == {"1", "4"}  # horizon 8 is past the rollout: left out, not invented
    assert res["4"]["model_psnr"] == 99 and res["4"]["model_ssim"] == pytest.approx(1.0)
    direct = psnr(torch.from_numpy(last), torch.from_numpy(truth[:, 3])).mean()
    assert res["4"]["copy_last_psnr"] == pytest.approx(float(direct), rel=1e-5)


@pytest.mark.parametrize("ckpt,extra,label", [
    ("teacher/teacher.safetensors", ["--euler-steps", "3"], "euler-3 (bidirectional"),
    ("ar/ar_diffusion.safetensors", ["--sampler", "few", "--steps", "1", "2"], "2-step"),
])
def test_eval_cli_writes_json_and_table(run, tmp_path, ckpt, extra, label):
    d, ae, root = run
    out = tmp_path / "results.json"
    report = eval_main(["--checkpoint", str(root / ckpt), "--autoencoder", str(ae), "--data", str(d),
                        "--horizons", "1", "4", "16", "--context", "2", "--episodes", "2", "--out", str(out)] + extra)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert report["episodes"] == 2 and any(label in r["sampler"] for r in report["results"])
    for r in report["results"]:
        assert set(r["horizons"]) == {"1", "4", "16"}
        for m in r["horizons"].values():
            assert {"model_psnr", "copy_last_psnr", "model_ssim", "copy_last_ssim", "ae_recon_psnr"} <= set(m)
            assert 0 < m["model_psnr"] < 99 and 0 < m["copy_last_psnr"]
        assert r["latency"]["per_frame_s"] > 0
    table = out.with_suffix(".md").read_text()
    assert "copy-last PSNR" in table and "| 16 |" in table


def test_fidelity_table_merges_reports_with_their_baselines(tmp_path):
    """benchmarks.fidelity_table: one row per (report, sampler), copy-last and the ceiling as rows, numbers
    taken from the reports (missing horizons shown as '-')."""
    import json

    from benchmarks import fidelity_table

    def report(psnr):
        m = {"model_psnr": psnr, "model_ssim": 0.5, "copy_last_psnr": 20.0, "copy_last_ssim": 0.4,
             "ae_recon_psnr": 30.0, "ae_ssim": 0.9}
        return {"results": [{"sampler": "2-step", "horizons": {"1": m, "8": m}}]}

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(report(25.0)))
    b.write_text(json.dumps({"results": [{"sampler": "euler", "horizons": {"1": report(27.5)["results"][0]["horizons"]["1"]}}]}))
    text = fidelity_table.main([f"A={a}", f"B={b}", "--out", str(tmp_path / "t.md")])
    lines = text.splitlines()
    assert lines[0] == "| model: sampler | h1 PSNR / SSIM | h8 PSNR / SSIM |"
    assert "| A: 2-step | 25.00 / 0.500 | 25.00 / 0.500 |" in lines and "| B: euler | 27.50 / 0.500 | - |" in lines
    assert "| copy last context frame | 20.00 / 0.400 | 20.00 / 0.400 |" in lines
    assert (tmp_path / "t.md").read_text() == text
