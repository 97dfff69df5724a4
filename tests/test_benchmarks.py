"""benchmarks.flops against hand counts and torch's FLOP counter; benchmarks.speed end to end on a tiny
config; the capability-based default dtype."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import speed
from benchmarks.flops import decoder_cost, decoder_params, dit_call, dit_params, streaming_block, teacher_frame
from worldmodel.config import AutoencoderConfig, DiTConfig, FlowConfig, GeneratorConfig
from worldmodel.diffusion.flow import sigma_grid
from worldmodel.eval import WindowedEulerGenerator
from worldmodel.inference.generator import StreamingGenerator
from worldmodel.inference.world import default_dtype
from worldmodel.models.autoencoder import Autoencoder
from worldmodel.models.dit import WorldDiT

# dim 8, one layer, 2 heads, latents 4x4x4, patch 2 -> N = 4 tokens of 16 values, MLP hidden 32.
HAND_DIT = DiTConfig(latent_channels=4, latent_height=4, latent_width=4, patch_size=2, dim=8, depth=1, heads=2,
                     prev_frame_input=False)
# decoder widths [16, 16, 8, 4]: 2x2 latents -> 16x16 frames in the hand count, 4x4 -> 32x32 with HAND_DIT.
HAND_AE = AutoencoderConfig(latent_channels=4, base_channels=4, blocks_per_level=1, decoder_base_channels=4)
STATS = {"mean": [0.0] * 5, "std": [1.0] * 5}


def _counted(fn) -> int:
    """FLOPs torch counts (linears and convolutions; it does not count CPU attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_dit_counts_match_a_hand_count():
    # params: patch 16*8+8 = 136; time MLP 256*8+8 + 8*8+8 = 2128; pose MLP 5*8+8 + 72 = 120; null pose 8;
    # block: qkv 8*24+24 = 216, q/k RMSNorm 4+4, proj 72, MLP 8*32+32 + 32*8+8 = 552, adaLN 8*48+48 = 432;
    # final adaLN 8*16+16 = 144, final linear 8*16+16 = 144.
    assert dit_params(HAND_DIT) == 136 + 2128 + 120 + 8 + (216 + 8 + 72 + 552 + 432) + 144 + 144 == 3960
    assert WorldDiT(HAND_DIT).num_params() == 3960
    # One frame (4 tokens) attending to 2 cached frames + itself (12 keys), batch 1.
    # per token: patch 2*16*8 + final 2*8*16 + qkv 2*8*24 + proj 2*8*8 + MLP 2*(8*32 + 32*8) = 2048;
    # per frame: time MLP 2*(256*8 + 64) + pose MLP 2*(5*8 + 64) + adaLN 2*8*48 + final adaLN 2*8*16 = 5456;
    # attention: 2 matmuls * 2 * 4 queries * 12 keys * 8 = 1536.
    cost = dit_call(HAND_DIT, batch=1, frames=1, visible_frames=2, bytes_per_el=4)
    assert cost.flops == 4 * 2048 + 5456 + 1536
    # weights once + cached K and V read (1 layer * 2 * 2 frames * 4 tokens * 8), fp32.
    assert cost.bytes == 4 * (3960 + 128)
    assert dit_call(HAND_DIT, 1, 1, 2, 4, write=True).bytes == cost.bytes + 4 * 2 * 4 * 8
    # With the previous frame's patch beside each patch the embedding reads 32 inputs: +128 params, +256 FLOPs/token.
    with_prev = dataclasses.replace(HAND_DIT, prev_frame_input=True)
    assert dit_params(with_prev) == WorldDiT(with_prev).num_params() == 3960 + 128
    assert dit_call(with_prev, 1, 1, 2, 4).flops == cost.flops + 4 * 256


def test_decoder_counts_match_a_hand_count():
    # conv in 4->16 @2x2; 2x 16->16 @2x2; up, 16->16 @4x4; 2x 16->16 @4x4; up, 16->8 @8x8; 2x 8->8 @8x8;
    # up, 8->4 @16x16; 2x 4->4 @16x16; out 4->3 @16x16 (2 FLOPs * cin * cout * 9 * pixels each).
    hand = 2 * 9 * (4 * 16 * 4 + 2 * 16 * 16 * 4 + 16 * 16 * 16 + 2 * 16 * 16 * 16 + 16 * 8 * 64 + 2 * 8 * 8 * 64
                    + 8 * 4 * 256 + 2 * 4 * 4 * 256 + 4 * 3 * 256)
    assert hand == 907776
    assert decoder_cost(HAND_AE, 1, 16, 16, 4).flops == hand
    ae = Autoencoder(HAND_AE)
    assert decoder_params(HAND_AE) == ae.num_params()["decoder"]
    with torch.no_grad():
        assert _counted(lambda: ae.decoder(torch.randn(3, 4, 2, 2))) == 3 * hand


@pytest.mark.parametrize("steps,block", [(2, 1), (4, 3)])
def test_streaming_count_equals_what_the_generator_runs(steps, block):
    """One steady block of the real StreamingGenerator, counted by torch, = the analytic count minus the
    attention matmuls (which torch's counter skips on the CPU)."""
    ae_cfg = dataclasses.replace(HAND_AE, latent_channels=4)
    gen_cfg = GeneratorConfig(steps=steps, block_size=block, cache_frames=5, sink_frames=1, context_frames=2)
    gen = StreamingGenerator(WorldDiT(HAND_DIT), Autoencoder(ae_cfg), STATS, gen_cfg, FlowConfig())
    B, n = 2, gen_cfg.cache_frames
    gen.reset(torch.randn(B, n, 4, 4, 4), torch.zeros(B, n, 5), latents=True)
    gen.step_block(torch.zeros(B, block, 5))  # the first block uses first_frame_steps
    counted = _counted(lambda: gen.step_block(torch.zeros(B, block, 5)))
    cost = streaming_block(HAND_DIT, ae_cfg, steps=steps, block_size=block, cache_frames=n, batch=B,
                           height=32, width=32, bytes_per_el=4)
    N, D = HAND_DIT.tokens_per_frame, HAND_DIT.dim
    attention = (steps + 1) * HAND_DIT.depth * 4 * B * block * N * (n + block) * N * D
    assert counted == cost.flops - attention


def test_teacher_count_equals_what_the_windowed_euler_generator_runs():
    dit, ae = WorldDiT(HAND_DIT), Autoencoder(HAND_AE)
    gen = WindowedEulerGenerator(dit, ae, STATS, mode="bidirectional", window=3, sigmas=sigma_grid(5, 3.0),
                                 device=torch.device("cpu"))
    gen.reset(torch.zeros(2, 2, 32, 32, 3, dtype=torch.uint8), torch.zeros(2, 2, 5))
    counted = _counted(lambda: gen.step(torch.zeros(2, 5)))
    cost = teacher_frame(HAND_DIT, HAND_AE, euler_steps=5, window=3, batch=2, height=32, width=32, bytes_per_el=4)
    N, D = HAND_DIT.tokens_per_frame, HAND_DIT.dim
    assert counted == cost.flops - 5 * 4 * 2 * (3 * N) ** 2 * D


def test_floor_is_the_slower_of_compute_and_memory():
    cost = dit_call(HAND_DIT, 1, 1, 2, 4)
    assert cost.floor_s(cost.flops, 1e30) == pytest.approx(1.0)
    assert cost.floor_s(1e30, cost.bytes / 2) == pytest.approx(2.0)


TINY_YAML = """
autoencoder: {latent_channels: 4, base_channels: 8, blocks_per_level: 1, decoder_base_channels: 8}
dit: {latent_channels: 4, latent_height: 4, latent_width: 4, patch_size: 2, dim: 32, depth: 2, heads: 2}
data: {frame_height: 32, frame_width: 32, clip_frames: 4}
generator: {cache_frames: 6, context_frames: 2}
"""


def test_speed_benchmark_runs_end_to_end(tmp_path):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(TINY_YAML)
    out = tmp_path / "speed.json"
    report = speed.main(["--config", str(cfg_path), "--device", "cpu", "--frames", "2", "--teacher-frames", "1",
                         "--batches", "1", "2", "--threads", "1", "--peak-flops", "1e10", "--bandwidth", "1e10",
                         "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == report["rows"] and "random weights" in saved["note"]
    # The dtype default_dtype picks on this CPU (bf16 with AMX / AVX512-BF16, fp32 on AVX2-only machines).
    assert saved["dtype"] == str(default_dtype("cpu")).removeprefix("torch.")
    table = out.with_suffix(".md").read_text()
    rows = {(r["sampler"], r["batch"]): r for r in report["rows"]}
    assert set(rows) == {(s, b) for s in ["frame-1", "frame-2", "frame-4", "chunk3-4"] for b in (1, 2)} | {("teacher", 1)}
    assert table.count("\n| config") == len(rows)
    for r in rows.values():
        assert r["first_frame_ms"] > 0 and r["step_p90_ms"] >= r["step_median_ms"] > 0 and r["fps"] > 0
        assert r["floor_ms"] == pytest.approx(1e3 * max(r["gflop_per_frame"] * 1e9 * r["batch"] * r["frames_per_call"],
                                                        r["mb_per_call"] * 1e6) / 1e10)
    assert rows[("chunk3-4", 1)]["frames_per_call"] == 3
    # Both first-frame times (from uint8 frames and from latents, as a packaged world resets) are measured, and
    # the report says how (a change of method makes old and new first-frame columns incomparable).
    assert all(r["first_frame_latents_ms"] > 0 for (sampler, _), r in rows.items() if sampler != "teacher")
    assert "median of 5" in saved["first_frame_method"]
    # 48 network calls over a 4-frame window per teacher frame against 2 one-frame calls.
    assert rows[("teacher", 1)]["step_median_ms"] > 3 * rows[("frame-1", 1)]["step_median_ms"]
    assert rows[("frame-4", 1)]["gflop_per_frame"] > rows[("frame-2", 1)]["gflop_per_frame"] > rows[("frame-1", 1)]["gflop_per_frame"]


def test_default_dtype_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert default_dtype("cpu") == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert default_dtype(torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert default_dtype("cuda") == torch.bfloat16


@pytest.mark.parametrize("block", [1, 3])
def test_window_reuse_in_forward_cached_is_bit_identical(block):
    """The no-grad path rotates the cached window once per block and reuses it for every denoising call;
    it must give exactly what the autograd path (cat and rotate on every call) gives, across ring wraps."""
    torch.manual_seed(0)
    model = WorldDiT(HAND_DIT)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # no zero gates: every path carries numbers

    def stream(ctx) -> list[torch.Tensor]:
        torch.manual_seed(1)
        cache, outs = model.new_cache(2, 5, 1, "cpu", torch.float32), []
        with ctx():
            for _ in range(6):  # 6 blocks through a 5-frame window: the ring wraps
                pose, x = torch.randn(2, block, 5), torch.randn(2, block, 4, 4, 4)
                for s, write in ((1.0, False), (0.6, False), (0.0, True)):
                    outs.append(model.forward_cached(x, torch.full((2, block), s), pose, cache, write=write).detach())
        return outs

    reference = stream(torch.enable_grad)
    for ctx in (torch.no_grad, torch.inference_mode):
        assert all(torch.equal(a, b) for a, b in zip(reference, stream(ctx)))


def test_speed_benchmark_measures_the_static_path_beside_eager(tmp_path, capsys):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(TINY_YAML)
    out = tmp_path / "speed.json"
    report = speed.main(["--config", str(cfg_path), "--device", "cpu", "--frames", "2", "--samplers", "frame-2", "chunk3-4",
                         "--batches", "1", "--graphs", "--threads", "1", "--peak-flops", "1e10", "--bandwidth", "1e10",
                         "--out", str(out)])
    rows = {(r["sampler"], r["path"]): r for r in report["rows"]}
    # No CUDA graphs on the CPU: the graph rows would repeat the static ones and are skipped; chunk-wise is eager only.
    assert set(rows) == {("frame-2", "eager"), ("frame-2", "static"), ("chunk3-4", "eager")}
    assert "skipped" in capsys.readouterr().err
    static = rows[("frame-2", "static")]
    assert static["graphed"] is False and static["capture_error"] is None and static["step_median_ms"] > 0
    assert "| frame-2 static | 1 |" in out.with_suffix(".md").read_text()
