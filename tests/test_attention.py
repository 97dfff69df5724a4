"""Masks of the attention modes, the attention function, and the ring-buffer KV cache."""

import pytest
import torch

from worldmodel.models.attention import KVCache, attention, block_causal_mask, teacher_forcing_mask


def _block(mask: torch.Tensor, n: int, qi: int, ki: int) -> torch.Tensor:
    return mask[qi * n : (qi + 1) * n, ki * n : (ki + 1) * n]


@pytest.mark.parametrize("frames,block_size", [(6, 1), (6, 3), (7, 3)])
def test_block_causal_mask_structure(frames, block_size):
    n = 4
    m = block_causal_mask(frames, n, block_size)
    assert m.shape == (frames * n, frames * n) and m.dtype == torch.bool
    for qf in range(frames):
        for kf in range(frames):
            expect = kf // block_size <= qf // block_size
            assert bool(_block(m, n, qf, kf).all()) == expect and bool(_block(m, n, qf, kf).any()) == expect


@pytest.mark.parametrize("frames,block_size", [(6, 1), (6, 3), (5, 2)])
def test_teacher_forcing_mask_structure(frames, block_size):
    # DESIGN §4 stage 2: clean tokens attend block-causally to clean tokens; noisy block i attends to
    # clean blocks < i and to itself; nothing else. Checked for every (query frame, key frame) pair.
    n, T = 3, frames
    m = teacher_forcing_mask(T, n, block_size)
    assert m.shape == (2 * T * n, 2 * T * n)
    for q in range(2 * T):
        for k in range(2 * T):
            q_noisy, k_noisy = q >= T, k >= T
            qb, kb = (q % T) // block_size, (k % T) // block_size
            if not q_noisy:
                expect = (not k_noisy) and kb <= qb
            else:
                expect = (kb < qb) if not k_noisy else (kb == qb)
            tile = _block(m, n, q, k)
            assert bool(tile.all()) == expect and bool(tile.any()) == expect, (q, k)


def test_masks_are_cached():
    assert block_causal_mask(4, 2, 1) is block_causal_mask(4, 2, 1)
    assert teacher_forcing_mask(4, 2, 2) is teacher_forcing_mask(4, 2, 2)


def test_attention_matches_explicit_softmax():
    q, k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 12, 8), torch.randn(2, 3, 12, 8)
    mask = torch.rand(10, 12) > 0.3
    mask[:, 0] = True  # every query sees at least one key
    logits = q @ k.transpose(-1, -2) / 8**0.5
    ref = logits.masked_fill(~mask, float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(attention(q, k, v, mask), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention(q, k, v), logits.softmax(-1) @ v, atol=1e-5, rtol=1e-5)


def _frame_kv(frame: int, B=2, H=2, N=3, hd=4):
    """A block of keys whose every entry encodes its absolute frame index (to read the cache back)."""
    return torch.full((B, H, N, hd), float(frame))


@pytest.mark.parametrize("block", [1, 3])
def test_kv_cache_ring_keeps_sinks_and_recent_frames_in_order(block):
    cache = KVCache(num_layers=2, batch_size=2, heads=2, head_dim=4, tokens_per_frame=3,
                    cache_frames=7, sink_frames=2, device="cpu", dtype=torch.float32)
    storage = [t.data_ptr() for t in cache.k + cache.v]
    written = 0
    for step in range(40):
        frames = list(range(written, written + block))
        for layer in range(2):
            kv = torch.cat([_frame_kv(f) for f in frames], dim=2)
            cache.append(layer, kv + layer, -kv)
        cache.advance(block)
        written += block
        expect = list(range(min(written, 2))) + list(range(max(2, written - 5), written))
        assert cache.frames_visible == len(expect)
        for layer in range(2):
            k, v, pos = cache.visible(layer)
            got = k[0, 0, ::3, 0].tolist()  # one token per frame
            assert got == [f + layer for f in expect]
            assert (-v[0, 0, ::3, 0]).tolist() == expect
            assert pos.tolist() == list(range(len(expect)))  # window-relative: never grows
    assert [t.data_ptr() for t in cache.k + cache.v] == storage  # static buffers, never reallocated


def test_kv_cache_errors_name_the_fix():
    with pytest.raises(ValueError, match="sink_frames"):
        KVCache(1, 1, 1, 4, 2, cache_frames=2, sink_frames=2, device="cpu", dtype=torch.float32)
    cache = KVCache(1, 1, 1, 4, 2, cache_frames=3, sink_frames=1, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="raise cache_frames"):  # 4 frames into 3 slots
        cache.append(0, torch.zeros(1, 1, 8, 4), torch.zeros(1, 1, 8, 4))
    cache.append(0, torch.zeros(1, 1, 6, 4), torch.zeros(1, 1, 6, 4))  # 3 into an empty cache: a prefill fits
    cache.advance(1)
    with pytest.raises(ValueError, match="raise cache_frames"):  # 3 after the sink: the ring holds 2
        cache.append(0, torch.zeros(1, 1, 6, 4), torch.zeros(1, 1, 6, 4))
