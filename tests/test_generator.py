"""StreamingGenerator: equals a hand-written sampler over the plain causal forward, deterministic under a
seed, pose-driven, batched, and runs thousands of frames in flat memory."""

import gc
import resource

import numpy as np
import pytest
import torch

from worldmodel.config import AutoencoderConfig, FlowConfig, GeneratorConfig
from worldmodel.diffusion.flow import add_noise, step_sigmas
from worldmodel.inference.generator import StreamingGenerator
from worldmodel.models.autoencoder import Autoencoder, frames_to_tensor
from worldmodel.models.dit import WorldDiT, dit_config

FH, FW, C = 32, 48, 4  # frames 32x48 -> latents 4x4x6
STATS = {"mean": [1.0, 0.0, 0.0, 0.5, 0.0], "std": [2.0, 1.0, 1.0, 3.0, 1.0]}



def make_nets(depth: int = 2):
    torch.manual_seed(0)
    dit = WorldDiT(dit_config("tiny", depth=depth, latent_channels=C, latent_height=FH // 8, latent_width=FW // 8))
    with torch.no_grad():  # leave adaLN-Zero's all-zero start so that the outputs depend on the inputs
        for p in dit.parameters():
            if not p.any():
                p.normal_(std=0.1)
    ae = Autoencoder(AutoencoderConfig(latent_channels=C, base_channels=8, decoder_base_channels=8))
    return dit.eval(), ae.eval()


def make_gen(dit, ae, block_size=1, steps=2, first=4, cache_frames=6, context_noise=0.0):
    gen_cfg = GeneratorConfig(steps=steps, first_frame_steps=first, block_size=block_size, cache_frames=cache_frames, sink_frames=1)
    flow_cfg = FlowConfig(shift=3.0, context_noise_inference=context_noise)
    return StreamingGenerator(dit, ae, STATS, gen_cfg, flow_cfg, device="cpu", dtype=torch.float32)


def context(B=2, T0=3, seed=0):
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, size=(B, T0, FH, FW, 3), dtype=np.uint8)
    deltas = rng.normal(size=(B, T0, 5)).astype(np.float32)
    return frames, deltas


@pytest.mark.parametrize("block", [1, 3])
def test_generator_equals_hand_written_sampler_over_causal_forward(block):
    dit, ae = make_nets()
    gen = make_gen(dit, ae, block_size=block, cache_frames=16)
    frames, deltas = context(T0=3)
    B = 2
    rng = np.random.default_rng(1)
    new_deltas = [rng.normal(size=(B, block, 5)).astype(np.float32) for _ in range(3)]
    gen.reset(frames, deltas, generator=torch.Generator().manual_seed(7))
    got = [gen.step_block(d, decode=False) for d in new_deltas]

    # Reference: the same sampling written against forward(mode="causal") over the whole history.
    g = torch.Generator().manual_seed(7)
    norm = lambda d: (torch.as_tensor(d) - torch.tensor(STATS["mean"])) / torch.tensor(STATS["std"])  # noqa: E731
    with torch.no_grad():
        z = ae.encode(frames_to_tensor(torch.as_tensor(frames).flatten(0, 1))).unflatten(0, (B, 3))
        poses, sigmas = norm(deltas), torch.zeros(B, 3)
        for k, d in enumerate(new_deltas):
            pose = torch.cat([poses, norm(d)], 1)
            x = torch.randn(B, block, *z.shape[2:], generator=g)
            sig = step_sigmas(4 if k == 0 else 2, 3.0)
            for i, s in enumerate(sig):
                v = dit(torch.cat([z, x], 1), torch.cat([sigmas, torch.full((B, block), s)], 1), pose,
                        mode="causal", block_size=block)[:, -block:]
                x0 = x - s * v
                if i + 1 < len(sig):
                    x = add_noise(x0, torch.randn(x.shape, generator=g), sig[i + 1])
            torch.testing.assert_close(got[k], x0, atol=1e-4, rtol=1e-4)
            z, poses, sigmas = torch.cat([z, x0], 1), pose, torch.cat([sigmas, torch.zeros(B, block)], 1)


def test_deterministic_given_seed_and_pose_driven():
    dit, ae = make_nets()
    frames, deltas = context()

    def run(seed, turn):
        gen = make_gen(dit, ae)
        gen.reset(torch.as_tensor(frames), torch.as_tensor(deltas), generator=torch.Generator().manual_seed(seed))
        return torch.stack([gen.step(torch.tensor([[2.0, 0, 0, turn, 0]] * 2)) for _ in range(4)], 1)

    a, b = run(0, 5.0), run(0, 5.0)
    assert a.dtype == torch.uint8 and a.shape == (2, 4, FH, FW, 3)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(run(1, 5.0), a)
    assert not torch.equal(run(0, -5.0), a)  # another camera motion, another world


def test_chunkwise_step_hands_out_a_block_one_frame_per_call():
    dit, ae = make_nets()
    gen = make_gen(dit, ae, block_size=3, cache_frames=8)
    frames, deltas = context()
    gen.reset(frames, deltas, generator=torch.Generator().manual_seed(0))
    written = []
    for _ in range(6):
        gen.step(np.zeros((2, 5), np.float32), decode=False)
        written.append(gen.cache.frames_written)
    assert written == [6, 6, 6, 9, 9, 9]  # 3 context frames, then a block of 3 per 3 calls


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _live_tensors() -> int:
    return sum(1 for o in gc.get_objects() if type(o) in (torch.Tensor, torch.nn.Parameter))


def test_long_rollout_memory_is_flat_and_finite():
    dit, ae = make_nets(depth=1)
    gen = make_gen(dit, ae, steps=1, cache_frames=6)
    frames, deltas = context(B=1, T0=2)
    gen.reset(frames, deltas, generator=torch.Generator().manual_seed(0))
    cache = gen.cache
    ptrs, nbytes = [t.data_ptr() for t in cache.k + cache.v], cache.nbytes()
    d = torch.tensor([[1.0, 0.0, 0.0, 2.0, 0.0]])
    for _ in range(50):  # warm-up: allocator pools, the cache fills and starts to wrap
        gen.step(d, decode=False)
    gc.collect()
    objects0, tensors0, rss0 = len(gc.get_objects()), _live_tensors(), _rss_mb()
    for i in range(2000):
        z = gen.step(d, decode=i % 250 == 0)
        if i % 250 == 0:
            assert z.shape == (1, FH, FW, 3) and z.dtype == torch.uint8
        elif not torch.isfinite(z).all():
            raise AssertionError(f"non-finite latent at frame {i}")
    gc.collect()
    assert cache.frames_written == 2052 and cache.frames_visible == 6
    assert [t.data_ptr() for t in cache.k + cache.v] == ptrs and cache.nbytes() == nbytes
    assert _live_tensors() <= tensors0 + 2, "tensors accumulate across frames"
    assert len(gc.get_objects()) < objects0 + 500, "Python objects accumulate across frames"
    assert _rss_mb() - rss0 < 32, f"RSS grew {_rss_mb() - rss0:.1f} MB over 2000 frames"
    z = gen.step(d, decode=False)
    assert torch.isfinite(z).all() and z.abs().max() < 1e3


def test_low_precision_copy_leaves_the_callers_model_alone():
    dit, ae = make_nets()
    gen = StreamingGenerator(dit, None, STATS, GeneratorConfig(cache_frames=6), FlowConfig(), dtype=torch.bfloat16)
    assert next(dit.parameters()).dtype == torch.float32 and next(gen.dit.parameters()).dtype == torch.bfloat16
    z = torch.randn(1, 2, C, FH // 8, FW // 8)
    gen.reset(z, np.zeros((1, 2, 5), np.float32), latents=True)
    out = gen.step(np.zeros((1, 5), np.float32), decode=False)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    with pytest.raises(RuntimeError, match="decode=False"):
        gen.step(np.zeros((1, 5), np.float32))


def test_bad_inputs_raise_clear_errors():
    dit, ae = make_nets()
    gen = make_gen(dit, ae)
    with pytest.raises(RuntimeError, match="reset"):
        gen.step_block(np.zeros((2, 1, 5), np.float32))
    frames, deltas = context()
    with pytest.raises(ValueError, match="uint8"):
        gen.reset(frames.astype(np.float32), deltas)
    gen.reset(frames, deltas)
    with pytest.raises(ValueError, match="block_size"):
        gen.step_block(np.zeros((2, 2, 5), np.float32))
    with pytest.raises(ValueError, match="pose_stats"):
        StreamingGenerator(dit, ae, {"mean": [0] * 4, "std": [1] * 4}, GeneratorConfig(), FlowConfig())


def test_autoencoder_shapes_and_latent_scale_round_trip():
    _, ae = make_nets()
    x = torch.rand(3, 3, FH, FW) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x)
        rec = ae.decode(z)
        assert z.shape == (3, C, FH // 8, FW // 8) and rec.shape == x.shape
        ae.set_latent_scale(4.0)
        torch.testing.assert_close(ae.encode(x), z / 4)  # encode scales to unit variance ...
        torch.testing.assert_close(ae.decode(ae.encode(x)), rec, atol=1e-5, rtol=1e-5)  # ... decode undoes it
    assert "latent_scale" in ae.state_dict()
    with pytest.raises(ValueError, match="multiples of 8"):
        ae.encode(torch.zeros(1, 3, 30, 48))
    with pytest.raises(ValueError, match="positive"):
        ae.set_latent_scale(0.0)


@pytest.mark.parametrize("block,T0,sinks,cache_frames", [(1, 4, 1, 6), (1, 9, 1, 6), (2, 5, 0, 6), (3, 3, 1, 6)])
def test_one_pass_context_prefill_writes_what_block_by_block_writes(block, T0, sinks, cache_frames):
    """reset() writes the context that fits the window in one block-causal call; the same keys, values and
    next frames as one call per block (T0 = 9 > 6 frames: the tail goes block by block), context noise included."""
    dit, ae = make_nets()
    frames, deltas = context(T0=T0)
    new = [np.random.default_rng(5 + k).normal(size=(2, block, 5)).astype(np.float32) for k in range(3)]

    def gen_for():
        gen = make_gen(dit, ae, block_size=block, cache_frames=cache_frames, context_noise=0.1)
        gen.sink_frames = sinks
        return gen

    fast = gen_for()
    fast.reset(frames, deltas, generator=torch.Generator().manual_seed(3))
    ref = gen_for()  # the former reset: one _write per block
    with torch.inference_mode():
        ref.cache = dit.new_cache(2, cache_frames, sinks, "cpu", torch.float32)
        ref.generator = torch.Generator().manual_seed(3)
        z, pose = ref.encode(frames), ref._pose(deltas)
        for i in range(0, T0, block):
            ref._write(z[:, i : i + block], pose[:, i : i + block])
    assert fast.cache.frames_written == ref.cache.frames_written == T0
    for layer in range(dit.cfg.depth):
        for a, b in zip(fast.cache.visible(layer)[:2], ref.cache.visible(layer)[:2]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for d in new:
        torch.testing.assert_close(fast.step_block(d, decode=False), ref.step_block(d, decode=False), atol=1e-5, rtol=1e-5)


def test_prefill_longer_than_the_window_is_refused_by_the_network():
    dit, _ = make_nets()
    cache = dit.new_cache(1, 4, 0, "cpu", torch.float32)
    x = torch.zeros(1, 5, C, FH // 8, FW // 8)
    with pytest.raises(ValueError, match="overflows the 4-frame window"):
        dit.forward_cached(x, torch.zeros(1, 5), torch.zeros(1, 5, 5), cache, write=True, block_size=1)


def test_prefill_leaves_no_inference_tensor_in_the_shared_mask_cache():
    """reset() runs under inference mode; its prefill mask must not land in block_causal_mask's memo, which
    training's forward(mode="causal") reads with autograd on."""
    from worldmodel.models.attention import block_causal_mask

    dit, ae = make_nets()
    gen = make_gen(dit, ae, cache_frames=6)
    frames, deltas = context(T0=4)
    block_causal_mask.cache_clear()
    gen.reset(frames, deltas)
    mask = block_causal_mask(4, dit.tokens_per_frame, 1, torch.device("cpu"))
    assert not mask.is_inference()
    x = torch.randn(1, 4, C, FH // 8, FW // 8, requires_grad=True)
    dit(x, torch.zeros(1, 4), torch.zeros(1, 4, 5), mode="causal").sum().backward()  # autograd over the memo's mask
    assert x.grad is not None and x.grad.abs().sum() > 0
