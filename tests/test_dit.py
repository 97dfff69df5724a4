"""WorldDiT modes agree with each other: cached streaming == block-causal forward, a ring-buffer rollout ==
an independently written windowed reference, teacher forcing == streaming; pose conditioning matters."""

import pytest
import torch
import torch.nn.functional as F

from worldmodel.models.dit import DIT_SIZES, WorldDiT, apply_rope, dit_config, previous_frames

B, C, H, W = 2, 4, 4, 6  # tiny latents: 2x3 = 6 tokens per frame



def make_model(depth: int = 2, seed: int = 0, prev_frame_input: bool = True) -> WorldDiT:
    torch.manual_seed(seed)
    model = WorldDiT(dit_config("tiny", depth=depth, latent_channels=C, latent_height=H, latent_width=W,
                                prev_frame_input=prev_frame_input)).eval()
    # adaLN-Zero makes a fresh network output exactly 0; give the zero-initialised weights values so that
    # every comparison below is between non-trivial functions.
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.1)
    return model


def inputs(T: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, H, W, generator=g)
    sigma = torch.rand(B, T, generator=g)
    pose = torch.randn(B, T, 5, generator=g)
    return x, sigma, pose


def test_fresh_model_outputs_zero_and_counts_params():
    model = WorldDiT(dit_config("tiny", latent_channels=C, latent_height=H, latent_width=W))
    x, sigma, pose = inputs(3)
    assert model(x, sigma, pose).abs().max() == 0  # adaLN-Zero + zero output layer
    assert model.num_params() == sum(p.numel() for p in model.parameters()) > 0
    assert set(DIT_SIZES) >= {"tiny", "S"}


@pytest.mark.parametrize("block", [1, 3])
def test_streaming_with_cache_equals_causal_forward(block):
    model = make_model()
    T = 9
    x, sigma, pose = inputs(T)
    with torch.no_grad():
        ref = model(x, sigma, pose, mode="causal", block_size=block)
        cache = model.new_cache(B, cache_frames=16, sink_frames=1, device="cpu", dtype=torch.float32)
        out = [
            model.forward_cached(x[:, i : i + block], sigma[:, i : i + block], pose[:, i : i + block], cache, write=True)
            for i in range(0, T, block)
        ]
    torch.testing.assert_close(torch.cat(out, 1), ref, atol=1e-4, rtol=1e-4)
    assert ref.abs().mean() > 1e-2


def reference_window_rollout(model, x, sigma, pose, block, cache_frames, sinks):
    """Streaming semantics written out with Python lists (no KVCache): each block attends to
    [first `sinks` frames, last cache_frames - sinks earlier frames, itself] with positions 0..n+Tb-1, using
    every earlier frame's keys/values (un-rotated) as computed when that frame was generated."""
    T, N = x.shape[1], model.tokens_per_frame
    kv = [[] for _ in model.blocks]  # per layer: per frame (k, v), each (B, heads, N, hd)
    outs = []
    for start in range(0, T, block):
        past = list(range(start))
        window = past[:sinks] + past[sinks:][len(past[sinks:]) - min(len(past[sinks:]), cache_frames - sinks):]
        tb = min(block, T - start)
        cos, sin = model.rope(torch.arange(len(window) + tb), torch.float32)
        split = len(window) * N
        fresh = {}

        def make_attend(layer):
            def attend(q, k, v):
                fresh[layer] = (k, v)
                k_all = torch.cat([kv[layer][f][0] for f in window] + [k], dim=2)
                v_all = torch.cat([kv[layer][f][1] for f in window] + [v], dim=2)
                q = apply_rope(q, cos[split:], sin[split:])
                return F.scaled_dot_product_attention(q, apply_rope(k_all, cos, sin), v_all)

            return attend

        sl = slice(start, start + tb)
        prev = previous_frames(x[:, sl], x[:, start - 1] if start else None)  # the true previous frame
        outs.append(model.forward_with(x[:, sl], sigma[:, sl], pose[:, sl], None, make_attend, prev))
        for layer, (k, v) in fresh.items():
            kv[layer] += [(k[:, :, i * N : (i + 1) * N], v[:, :, i * N : (i + 1) * N]) for i in range(tb)]
    return torch.cat(outs, 1)


@pytest.mark.parametrize("block,cache_frames,sinks", [(1, 5, 1), (3, 7, 1), (1, 4, 0), (2, 6, 2)])
def test_rollout_longer_than_cache_matches_windowed_reference(block, cache_frames, sinks):
    model = make_model(depth=2)
    T = 8 * block + 6 if block > 1 else 20
    x, sigma, pose = inputs(T, seed=3)
    with torch.no_grad():
        ref = reference_window_rollout(model, x, sigma, pose, block, cache_frames, sinks)
        cache = model.new_cache(B, cache_frames, sinks, "cpu", torch.float32)
        out = []
        for i in range(0, T, block):
            sl = slice(i, i + block)
            out.append(model.forward_cached(x[:, sl], sigma[:, sl], pose[:, sl], cache, write=True))
        out = torch.cat(out, 1)
        full = model(x, sigma, pose, mode="causal", block_size=block)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # The window matters: once frames fall out of it, streaming departs from the full causal forward.
    early = cache_frames  # frames before the first eviction are identical
    torch.testing.assert_close(out[:, :early], full[:, :early], atol=1e-4, rtol=1e-4)
    assert (out[:, -block:] - full[:, -block:]).abs().max() > 1e-3


@pytest.mark.parametrize("block", [1, 3])
def test_one_layer_window_equals_public_bidirectional_forward(block):
    # With one layer a frame's keys/values depend only on its own input, so each streamed block must equal
    # a plain forward over [sinks, recent frames, block] (the window re-indexed from position 0) read at the block.
    # Without the previous-frame input: the re-indexed window would give its frames other predecessors.
    model = make_model(depth=1, prev_frame_input=False)
    cache_frames, sinks, T = 5, 1, 7 * block
    x, sigma, pose = inputs(T, seed=4)
    cache = model.new_cache(B, cache_frames, sinks, "cpu", torch.float32)
    with torch.no_grad():
        for start in range(0, T, block):
            past = list(range(start))
            idx = past[:sinks] + past[sinks:][max(0, len(past) - sinks - (cache_frames - sinks)) :]
            idx += list(range(start, start + block))
            ref = model(x[:, idx], sigma[:, idx], pose[:, idx], mode="bidirectional")[:, -block:]
            sl = slice(start, start + block)
            got = model.forward_cached(x[:, sl], sigma[:, sl], pose[:, sl], cache, write=True)
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("block", [1, 3])
def test_teacher_forcing_equals_streaming_on_clean_context(block):
    model = make_model()
    T = 6
    x_clean, _, pose = inputs(T, seed=5)
    x_noisy, sigma_noisy, _ = inputs(T, seed=6)
    sigma_clean = torch.full((B, T), 0.05)
    keep = torch.rand(B, T) > 0.3
    with torch.no_grad():
        tf = model.forward_teacher_forcing(x_clean, sigma_clean, x_noisy, sigma_noisy, pose, block_size=block, pose_keep=keep)
        for i in range(0, T, block):
            cache = model.new_cache(B, 16, 1, "cpu", torch.float32)
            for j in range(0, i, block):  # clean blocks < i, written as streaming would
                sl = slice(j, j + block)
                model.forward_cached(x_clean[:, sl], sigma_clean[:, sl], pose[:, sl], cache, write=True, pose_keep=keep[:, sl])
            sl = slice(i, i + block)
            got = model.forward_cached(x_noisy[:, sl], sigma_noisy[:, sl], pose[:, sl], cache, write=False, pose_keep=keep[:, sl])
            torch.testing.assert_close(got, tf[:, sl], atol=1e-4, rtol=1e-4)
            assert cache.frames_written == i  # write=False left the cache alone


def test_pose_conditioning_matters_and_is_causal():
    model = make_model()
    T = 4
    x, sigma, pose = inputs(T, seed=7)
    with torch.no_grad():
        base = model(x, sigma, pose, mode="causal")
        pose2 = pose.clone()
        pose2[:, -1] += 1.0  # change only the last frame's pose
        moved = model(x, sigma, pose2, mode="causal")
        keep = torch.ones(B, T, dtype=torch.bool)
        keep[:, -1] = False
        null = model(x, sigma, pose, mode="causal", pose_keep=keep)
        null2 = model(x, sigma, pose2, mode="causal", pose_keep=keep)
        all_keep = model(x, sigma, pose, mode="causal", pose_keep=torch.ones(B, T, dtype=torch.bool))
    assert (moved[:, -1] - base[:, -1]).abs().max() > 1e-3  # pose changes the output
    torch.testing.assert_close(moved[:, :-1], base[:, :-1])  # ... and never the past (causal)
    assert (null[:, -1] - base[:, -1]).abs().max() > 1e-3  # null pose differs from the pose
    torch.testing.assert_close(null, null2)  # a dropped pose is really ignored
    torch.testing.assert_close(all_keep, base)


def test_bidirectional_sees_the_future_causal_does_not():
    model = make_model()
    x, sigma, pose = inputs(4, seed=8)
    x2 = x.clone()
    x2[:, -1] += 1.0
    with torch.no_grad():
        for mode, sees in (("bidirectional", True), ("causal", False)):
            d = (model(x, sigma, pose, mode=mode) - model(x2, sigma, pose, mode=mode))[:, 0].abs().max()
            assert (d > 1e-4) == sees, mode


def test_bad_shapes_raise_clear_errors():
    model = make_model()
    x, sigma, pose = inputs(2)
    with pytest.raises(ValueError, match="latents"):
        model(x[:, :, :2], sigma, pose)
    with pytest.raises(ValueError, match="pose"):
        model(x, sigma, pose[..., :4])
    with pytest.raises(ValueError, match="mode"):
        model(x, sigma, pose, mode="sideways")


@pytest.mark.parametrize("block", [1, 3])
def test_previous_frame_input_reaches_the_next_block_through_the_cache(block):
    """With prev_frame_input a frame depends on its predecessor's input directly; streaming gets that frame
    from the cache (last written block), teacher forcing from the clean copy, both equal to the causal forward."""
    model = make_model(depth=1)
    T = 2 * block
    x, sigma, pose = inputs(T, seed=9)
    x2 = x.clone()
    x2[:, block - 1] += 1.0  # change only the frame before the second block
    with torch.no_grad():
        # The second block sees frame block-1 through attention and through prev; with the cache's keys and
        # values kept (written from x), swapping only last_frame changes only prev.
        cache = model.new_cache(B, 8, 1, "cpu", torch.float32)
        model.forward_cached(x[:, :block], sigma[:, :block], pose[:, :block], cache, write=True)
        torch.testing.assert_close(cache.last_frame, x[:, block - 1])
        a = model.forward_cached(x[:, block:], sigma[:, block:], pose[:, block:], cache, write=False)
        cache.last_frame = x2[:, block - 1].clone()
        b = model.forward_cached(x[:, block:], sigma[:, block:], pose[:, block:], cache, write=False)
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-3  # the block's first frame reads the previous frame
    no_prev = make_model(depth=1, prev_frame_input=False)
    assert no_prev.patch_embed.in_features * 2 == model.patch_embed.in_features
    with pytest.raises(ValueError, match="prev"):
        model.forward_with(x, sigma, pose, None, lambda layer: None)
