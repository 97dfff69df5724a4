"""benchmarks.train_throughput: every stage trains through the real loop on synthetic data with random
weights (no checkpoints needed) and reports its throughput (CPU, tiny config, seconds)."""

import json
from pathlib import Path

import pytest

from benchmarks import train_throughput

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def test_train_throughput_runs_every_stage_on_cpu(tmp_path, capsys):
    names = ("autoencoder", "teacher", "ar_diffusion", "causal_cd", "dmd")
    out = tmp_path / "rows.json"
    rows = train_throughput.main(["--config", str(TINY), "--stage", ",".join(names), "--batch", "4", "--steps", "2",
                                  "--warmup", "1", "--device", "cpu", "--json", str(out), "--work", str(tmp_path / "w"),
                                  "dit.depth=1", "stage.critic_steps=1"])
    assert [r["stage"] for r in rows] == list(names) and json.loads(out.read_text()) == rows
    for r in rows:
        assert r["steps_per_s"] > 0 and r["clips_per_s"] == pytest.approx(r["steps_per_s"] * 4)
        assert r["tokens_per_s"] == pytest.approx(r["clips_per_s"] * 4 * 6)  # 4 frames of 2x3 tokens
    table = capsys.readouterr().out.strip().splitlines()[-len(names) - 1:]
    assert table[0].split()[:3] == ["stage", "device", "batch"]
    assert [line.split()[0] for line in table[1:]] == list(names)
