"""StaticFrameStep (worldmodel.inference.graphed) against StreamingGenerator.step: the same frames for the same
noise over more frames than the window (the ring wraps), with and without sinks, context noise and the
previous-frame input, for B = 1 and B > 1, per-world noise and reset_rows; from the first frame after a reset
(the window partly filled, stale slots masked) when the first frame takes the same steps; one cache shared
with the eager path; and nothing in the step that a CUDA graph cannot capture (no host reads, no tensors from
host data).
CUDA graph capture itself needs a GPU: scripts/gpu_speed_graphs.sh runs it."""

import shutil

import numpy as np
import pytest
import torch

from worldmodel.config import AutoencoderConfig, FlowConfig, GeneratorConfig
from worldmodel.inference.batched import BatchedGenerator
from worldmodel.inference.generator import StreamingGenerator
from worldmodel.inference.graphed import StaticFrameStep
from worldmodel.models.autoencoder import Autoencoder
from worldmodel.models.dit import WorldDiT, dit_config

FH, FW, C = 32, 48, 4  # frames 32x48 -> latents 4x4x6 -> 2x3 tokens per frame
STATS = {"mean": [1.0, 0.0, 0.0, 0.5, 0.0], "std": [2.0, 1.0, 1.0, 3.0, 1.0]}
TIGHT = dict(atol=1e-5, rtol=1e-5)  # fp32: the two paths differ only by rounding (~1e-6 seen)


def make_nets(prev_frame_input: bool = True, qk_norm: bool = True):
    torch.manual_seed(0)
    dit = WorldDiT(dit_config("tiny", latent_channels=C, latent_height=FH // 8, latent_width=FW // 8,
                              prev_frame_input=prev_frame_input, qk_norm=qk_norm))
    with torch.no_grad():  # no all-zero adaLN gates: every path carries numbers
        for p in dit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ae = Autoencoder(AutoencoderConfig(latent_channels=C, base_channels=8, decoder_base_channels=8))
    return dit.eval(), ae.eval()


def make_gen(nets, fast, *, steps=2, first=4, sink=0, cache_frames=4, context_noise=0.0, block_size=1,
             cls=StreamingGenerator, dtype=torch.float32, device="cpu"):
    """first: first_frame_steps (4 by default: the first frame eager, the fast path from the second frame on)."""
    gen_cfg = GeneratorConfig(steps=steps, first_frame_steps=first, block_size=block_size, cache_frames=cache_frames,
                              sink_frames=sink)
    flow_cfg = FlowConfig(shift=3.0, context_noise_inference=context_noise)
    return cls(*nets, STATS, gen_cfg, flow_cfg, device=device, dtype=dtype, fast=fast)


def context(B, T0=3, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (B, T0, FH, FW, 3), dtype=np.uint8), rng.normal(size=(B, T0, 5)).astype(np.float32))


def deltas(B, n, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(B, 5)).astype(np.float32) for _ in range(n)]


def assert_same_cache(a, b):
    assert a.frames_written == b.frames_written
    for layer in range(a.num_layers):
        ka, va, _ = a.visible(layer)
        kb, vb, _ = b.visible(layer)
        torch.testing.assert_close(kb, ka, **TIGHT)
        torch.testing.assert_close(vb, va, **TIGHT)
    torch.testing.assert_close(b.last_frame, a.last_frame, **TIGHT)


@pytest.mark.parametrize("B,steps,sink,context_noise", [(1, 2, 0, 0.0), (3, 2, 0, 0.0), (2, 1, 1, 0.0),
                                                         (2, 4, 2, 0.0), (2, 2, 0, 0.1)])
def test_static_step_gives_the_eager_frames_across_ring_wraps(B, steps, sink, context_noise):
    nets = make_nets()
    eager, static = (make_gen(nets, f, steps=steps, sink=sink, context_noise=context_noise) for f in ("off", "static"))
    frames, ctx = context(B)
    for gen in (eager, static):
        gen.reset(frames, ctx, generator=torch.Generator().manual_seed(7))
    for k, d in enumerate(deltas(B, 14)):  # 3 context frames + 14 > 4-frame window: the ring wraps 3 times
        za, zb = eager.step(d, decode=False), static.step(d, decode=False)
        assert zb.shape == za.shape == (B, C, FH // 8, FW // 8)
        torch.testing.assert_close(zb, za, **TIGHT, msg=lambda m: f"frame {k}: {m}")
    assert static._frame_step is not None and eager._frame_step is None  # the fast path ran; the default did not
    assert_same_cache(eager.cache, static.cache)


@pytest.mark.parametrize("B,steps,sink,context_noise,T0", [(1, 2, 0, 0.0, 1), (2, 2, 1, 0.1, 1), (2, 1, 2, 0.0, 2),
                                                            (2, 4, 0, 0.1, 3)])
def test_static_step_from_the_first_frame_while_the_window_fills(B, steps, sink, context_noise, T0):
    """first_frame_steps == steps: the first frame after reset is the static step's too, through the partial
    states of the window (T0 .. cache_frames - 1 frames written), then the full window and its wraps."""
    nets = make_nets()
    eager, static = (make_gen(nets, f, steps=steps, first=steps, sink=sink, context_noise=context_noise)
                     for f in ("off", "static"))
    frames, ctx = context(B, T0=T0)
    for gen in (eager, static):
        gen.reset(frames, ctx, generator=torch.Generator().manual_seed(7))
    assert static.fast_ready() and not eager.fast_ready()
    for k, d in enumerate(deltas(B, 10)):
        za, zb = eager.step(d, decode=False), static.step(d, decode=False)
        if k == 0:
            assert static._frame_step is not None and static._frame_step._written == T0 + 1  # the first frame ran it
        torch.testing.assert_close(zb, za, **TIGHT, msg=lambda m: f"frame {k}: {m}")
    assert_same_cache(eager.cache, static.cache)


def test_a_reset_after_a_long_rollout_masks_the_stale_slots():
    """After a reset, the slots the window has not rewritten yet hold the old rollout's keys: the first frames
    must equal a fresh generator's (whose cache never held them), and do only because the mask drops them."""
    nets = make_nets()
    static, fresh = (make_gen(nets, f, first=2, sink=1, context_noise=0.1) for f in ("static", "off"))
    frames, ctx = context(2)
    static.reset(frames, ctx, generator=torch.Generator().manual_seed(1))
    for d in deltas(2, 9):
        static.step(d, decode=False)
    new_frames, new_ctx = context(2, T0=1, seed=5)
    new_deltas = deltas(2, 4, seed=6)

    def first_frames(gen):
        gen.reset(new_frames, new_ctx, generator=torch.Generator().manual_seed(2))
        return [gen.step(d, decode=False) for d in new_deltas]

    expected = first_frames(fresh)
    for k, (a, b) in enumerate(zip(expected, first_frames(static))):
        torch.testing.assert_close(b, a, **TIGHT, msg=lambda m: f"frame {k}: {m}")
    with torch.inference_mode():
        static.frame_step().key_mask.fill_(True)  # without the mask the stale keys leak into the attention
    assert not torch.allclose(first_frames(static)[0], expected[0], atol=1e-3)


def test_decoded_frames_match():
    nets = make_nets()
    eager, static = (make_gen(nets, f) for f in ("off", "static"))
    frames, ctx = context(2)
    for gen in (eager, static):
        gen.reset(frames, ctx, generator=torch.Generator().manual_seed(3))
    for d in deltas(2, 8):
        fa, fb = eager.step(d), static.step(d)
        assert fb.dtype == torch.uint8 and fb.shape == fa.shape == (2, FH, FW, 3)
        diff = (fa.int() - fb.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01  # latents equal to 1e-6: rounding ties only


def test_without_prev_frame_input_or_qk_norm():
    nets = make_nets(prev_frame_input=False, qk_norm=False)
    eager, static = (make_gen(nets, f, sink=1) for f in ("off", "static"))
    frames, ctx = context(2)
    for gen in (eager, static):
        gen.reset(frames, ctx, generator=torch.Generator().manual_seed(5))
    for d in deltas(2, 9):
        torch.testing.assert_close(static.step(d, decode=False), eager.step(d, decode=False), **TIGHT)


def test_eager_and_static_take_turns_on_one_cache():
    """The step shares the generator's cache: eager frames in between, and a reset() of the same batch, leave
    it consistent (phase and previous frame are picked up again)."""
    nets = make_nets()
    eager, mixed = make_gen(nets, "off"), make_gen(nets, "static")
    frames, ctx = context(2)
    ds = deltas(2, 20)
    for gen in (eager, mixed):
        gen.reset(frames, ctx, generator=torch.Generator().manual_seed(11))
    for k, d in enumerate(ds):
        if k == 12:  # restart both: same cache object, window refills eagerly, then the same step resumes
            for gen in (eager, mixed):
                gen.reset(frames[:, :2], ctx[:, :2], generator=torch.Generator().manual_seed(12))
        mixed.fast = "static" if k % 3 else "off"
        torch.testing.assert_close(mixed.step(d, decode=False), eager.step(d, decode=False), **TIGHT)
    assert mixed._frame_step is not None and mixed._frame_step.cache is mixed.cache
    assert_same_cache(eager.cache, mixed.cache)


def test_batched_generator_per_world_noise_and_reset_rows():
    nets = make_nets()
    eager, static = (make_gen(nets, f, cls=BatchedGenerator) for f in ("off", "static"))
    frames, ctx = context(3)
    gens = lambda seed: [torch.Generator().manual_seed(seed + b) for b in range(3)]  # noqa: E731
    for gen in (eager, static):
        gen.reset(frames, ctx, generator=gens(0))
    new_frames, new_ctx = context(3, seed=4)
    for k, d in enumerate(deltas(3, 12)):
        if k == 6:  # world 1 restarts while the others keep their cache (writes into the shared buffers)
            for gen in (eager, static):
                gen.reset_rows([False, True, False], new_frames, new_ctx, generator=gens(100))
        torch.testing.assert_close(static.step(d, decode=False), eager.step(d, decode=False), **TIGHT)
    assert_same_cache(eager.cache, static.cache)


def test_bf16_agrees_to_bf16_rounding():
    nets = make_nets()
    eager, static = (make_gen(nets, f, dtype=torch.bfloat16) for f in ("off", "static"))
    frames, ctx = context(2)
    for gen in (eager, static):
        gen.reset(frames, ctx, generator=torch.Generator().manual_seed(2))
    for d in deltas(2, 6):
        za, zb = eager.step(d, decode=False).float(), static.step(d, decode=False).float()
        assert (za - zb).abs().max() <= 0.05 * za.abs().max()


def test_the_step_reads_nothing_from_the_host(monkeypatch):
    """What CUDA graph capture forbids: host syncs (.item(), .cpu(), bool(t), ...) and tensors made from host
    data inside the step. Checked here on the CPU by making them raise while the step's device part runs."""
    nets = make_nets()
    gen = make_gen(nets, "static", sink=1, context_noise=0.1)
    frames, ctx = context(2)
    gen.reset(frames, ctx, generator=torch.Generator().manual_seed(0))
    for d in deltas(2, 3):
        gen.step(d)
    step = gen.frame_step()

    def forbidden(name):
        def f(*args, **kwargs):
            raise AssertionError(f"{name} inside StaticFrameStep._run")
        return f

    for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(f"Tensor.{name}"))
    for name in ("tensor", "as_tensor", "from_numpy"):
        monkeypatch.setattr(torch, name, forbidden(f"torch.{name}"))
    with torch.inference_mode():
        for decode in (True, False):
            for masked in (False, True):
                step._run(decode, masked)


def test_clear_errors():
    nets = make_nets()
    chunk = make_gen(nets, "static", block_size=3, cache_frames=8)
    chunk.reset(*context(1), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="frame-wise only"):
        StaticFrameStep(chunk)
    chunk.step(np.zeros((1, 5), np.float32))  # chunk-wise generators ignore fast and step eagerly
    gen = make_gen(nets, "static", cache_frames=6)
    with pytest.raises(RuntimeError, match="reset"):
        StaticFrameStep(gen)
    gen.reset(*context(1), generator=torch.Generator().manual_seed(0))
    for d in deltas(1, 4):
        gen.step(d)
    with pytest.raises(ValueError, match="CUDA"):
        StaticFrameStep(gen, graphs=True)
    with pytest.raises(ValueError, match=r"deltas must be \(B, 5\)"):
        gen.step(np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="fast must be one of"):
        make_gen(nets, "graphs")


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")),
                    reason="torch.compile's CPU backend (Inductor) needs a C++ compiler")
def test_compiled_step_gives_the_eager_frames_and_frees_itself():
    """fast="compile": the static step through torch.compile (Inductor's C++ on the CPU), with and without the
    decode, over ring wraps with a sink and context noise; dropping the generator frees the step."""
    import gc
    import weakref

    from torch._dynamo.utils import counters

    from worldmodel.inference.graphed import COMPILE_VARIANTS

    counters.clear()
    nets = make_nets()
    eager, compiled = (make_gen(nets, f, sink=1, context_noise=0.1) for f in ("off", "compile"))
    frames, ctx = context(2)
    for gen in (eager, compiled):
        gen.reset(frames, ctx, generator=torch.Generator().manual_seed(3))
    for k, d in enumerate(deltas(2, 10)):
        decode = k % 2 == 0
        a, b = eager.step(d, decode=decode), compiled.step(d, decode=decode)
        if decode:
            assert (a.int() - b.int()).abs().max() <= 1, k
        else:
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    step = compiled.frame_step()
    assert step.compiled and step.compile_error is None and step._compiled_for == {True, False}
    assert not counters["graph_break"], dict(counters["graph_break"])  # one graph per decode value, nothing eager between
    assert torch._dynamo.config.recompile_limit >= COMPILE_VARIANTS  # later configurations compile too
    ref = weakref.ref(step)
    del compiled, step, gen
    gc.collect()
    assert ref() is None


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (scripts/gpu_speed_graphs.sh)")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fast", ["graph", "compile"])
def test_cuda_graph_gives_the_eager_frames(dtype, fast):
    """From the first frame (first_frame_steps == steps): the partial-window graphs, then the steady ones."""
    nets = make_nets()
    eager, graphed = (make_gen(nets, f, first=2, sink=1, context_noise=0.1, dtype=dtype, device="cuda")
                      for f in ("off", fast))
    frames, ctx = context(2, T0=1)  # 3 partial-window frames (decode, latents, decode), then the full window
    for gen in (eager, graphed):
        gen.reset(frames, ctx, generator=torch.Generator("cuda").manual_seed(7))
    for k, d in enumerate(deltas(2, 12)):
        decode = k % 2 == 0  # both graphs (with and without the decode) in turn
        a, b = eager.step(d, decode=decode), graphed.step(d, decode=decode)
        if decode:
            assert (a.int() - b.int()).abs().float().mean() < (0.5 if dtype == torch.float32 else 3.0), k
        else:
            scale = a.float().abs().max()
            assert (a.float() - b.float()).abs().max() <= (1e-4 if dtype == torch.float32 else 0.05) * scale, k
    step = graphed.frame_step()
    assert step.graphs and step.capture_error is None and step.compile_error is None
    assert all(step._captured[(decode, masked)] is not None for decode in (True, False) for masked in (True, False))


def test_dropping_the_generator_frees_its_step():
    import weakref

    gen = make_gen(make_nets(), "static")
    gen.reset(*context(1), generator=torch.Generator().manual_seed(0))
    for d in deltas(1, 3):
        gen.step(d)
    ref = weakref.ref(gen.frame_step())
    del gen
    assert ref() is None  # no cycle: buffers (and on CUDA the graphs) go with the generator


def test_a_failed_compile_warns_and_runs_the_same_step_uncompiled(monkeypatch):
    """If Inductor fails (here: _run's compiled function raises, after the window's rotation compiled and ran),
    the step warns, keeps the error and gives the eager frames from the same state, then and afterwards."""

    def fake_compile(fn, **kwargs):
        if fn.__name__ == "_rotate_window":
            return fn  # "compiled" and working: the fallback rewrites the window from the ring again

        def failing(*args, **kw):
            raise RuntimeError("inductor broke")
        return failing

    monkeypatch.setattr(torch, "compile", fake_compile)
    nets = make_nets()
    eager, compiled = (make_gen(nets, f, sink=1) for f in ("off", "compile"))
    frames, ctx = context(2)
    for gen in (eager, compiled):
        gen.reset(frames, ctx, generator=torch.Generator().manual_seed(3))
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        for d in deltas(2, 8):
            a, b = eager.step(d, decode=False), compiled.step(d, decode=False)
            torch.testing.assert_close(b, a, **TIGHT)
    step = compiled.frame_step()
    assert step.compile_error == "RuntimeError: inductor broke" and step._compiled_run is None
    assert_same_cache(eager.cache, compiled.cache)
