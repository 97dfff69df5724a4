"""World format 2: a world without encoder.safetensors plays exactly like the same world with it (fp32 CPU),
needs the encoder only to encode frames and then says so; format-1 worlds still load and match; the decoder
file holds the decoder's parameters and nothing else; repack round-trips; weights split into parts load alike."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import play
from envs import WorldModelEnv, WorldModelVectorEnv
from tests.world_fixture import make_tiny_world
from worldmodel.checkpoint import part_paths
from worldmodel.inference import world as world_module
from worldmodel.inference.world import MissingEncoder, World, WorldError, main, repack, save_world
from worldmodel.models.autoencoder import Autoencoder

CPU = {"device": "cpu", "dtype": "float32"}
ACTIONS = [1, 7, 7, 5, 0, 2, 10, 3, 4, 6]  # 10 steps: the 4-frame cache wraps


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory):
    return make_tiny_world(tmp_path_factory.mktemp("format") / "full")


@pytest.fixture(scope="module")
def no_encoder_dir(full_dir):
    """The same world, encoder.safetensors (+ .json) taken out: what the committed copy ships."""
    out = shutil.copytree(full_dir, full_dir.parent / "no_encoder")
    (out / "encoder.safetensors").unlink()
    (out / "encoder.json").unlink()
    return out


@pytest.fixture(scope="module")
def v1_dir(full_dir):
    """The same world as the format-1 code wrote it: one autoencoder.safetensors, start frames without latents."""
    out = shutil.copytree(full_dir, full_dir.parent / "v1")
    tensors = {**load_file(str(out / "decoder.safetensors")), **load_file(str(out / "encoder.safetensors"))}
    save_file(tensors, str(out / "autoencoder.safetensors"))
    shutil.copy(out / "decoder.json", out / "autoencoder.json")
    for name in ("decoder", "encoder"):
        (out / f"{name}.safetensors").unlink()
        (out / f"{name}.json").unlink()
    with np.load(out / "start_contexts.npz") as d:
        np.savez(out / "start_contexts.npz", frames=d["frames"], deltas=d["deltas"], poses=d["poses"])
    info = json.loads((out / "world.json").read_text())
    (out / "world.json").write_text(json.dumps({**info, "format_version": 1}))
    return out


def single_frames(world, seed=3, start=None):
    env = WorldModelEnv(world=world, **CPU)
    out = [env.reset(seed=seed, options=None if start is None else {"start_index": start})[0]]
    out += [env.step(a)[0] for a in ACTIONS]
    return np.stack(out)


def vector_frames(world, n=3, seed=11):
    """Autoreset after 4 steps and a partial reset at step 6: both restart rows through reset_rows."""
    venv = WorldModelVectorEnv(n, world=world, max_episode_steps=4, **CPU)
    out = [venv.reset(seed=seed)[0]]
    for t, a in enumerate(ACTIONS):
        if t == 6:
            out.append(venv.reset(options={"reset_mask": [False, True, False], "start_index": 0})[0])
        out.append(venv.step(np.full(n, a))[0])
    return np.stack(out)


def test_world_without_encoder_plays_exactly_like_the_world_with_it(full_dir, no_encoder_dir, tmp_path):
    full, bare = World.load(full_dir), World.load(no_encoder_dir)
    assert full.has_encoder and not bare.has_encoder and bare.format_version == 2
    assert isinstance(bare.modules()[1].encoder, MissingEncoder)  # no random encoder weights anywhere
    np.testing.assert_array_equal(bare.start_latents, full.start_latents)
    # The stored latents are what the generator's own encode gives (fp32, CPU), one start context at a time.
    gen = full.generator(1, **CPU)
    for i in range(full.num_starts):
        torch.testing.assert_close(gen.encode(full.start_frames[i:i + 1])[0], torch.from_numpy(full.start_latents[i]),
                                   atol=0, rtol=0)
    for start in (None, 1):
        np.testing.assert_array_equal(single_frames(full, start=start), single_frames(bare, start=start))
    np.testing.assert_array_equal(vector_frames(full), vector_frames(bare))
    # play.py records it alike.
    for name, world_dir in (("full", full_dir), ("bare", no_encoder_dir)):
        play.main(["--headless", "--frames", "6", "--record", str(tmp_path / f"{name}.mp4"), "--world",
                   str(world_dir), "--device", "cpu", "--dtype", "float32", "--seed", "3"])
    sides = [json.loads((tmp_path / f"{n}.json").read_text()) for n in ("full", "bare")]
    assert sides[0]["poses"] == sides[1]["poses"] and sides[0]["frames"] == sides[1]["frames"] == 6
    assert (tmp_path / "full.mp4").read_bytes() == (tmp_path / "bare.mp4").read_bytes()


def test_encoding_without_encoder_names_the_file_and_the_fix(no_encoder_dir, tmp_path):
    world = World.load(no_encoder_dir)
    gen = world.generator(1, **CPU)
    frames, deltas = world.start_frames[:1], world.start_deltas[:1]
    with pytest.raises(WorldError, match=r"has no encoder\.safetensors.*python -m worldmodel\.build"):
        gen.reset(frames, deltas)
    with pytest.raises(WorldError, match=r"encoder\.safetensors"):
        gen.encode(frames)
    gen.reset(world.start_latents[:1], deltas, latents=True)  # latents need no encoder
    assert gen.step(np.zeros((1, 5), np.float32)).shape == (1, *world.frame_shape)
    # Nothing writes a world with an encoder it does not have.
    with pytest.raises(WorldError, match="--no-encoder"):
        repack(no_encoder_dir, tmp_path / "out")
    with pytest.raises(WorldError, match="encoder=False"):
        dit, ae = world.modules()
        save_world(tmp_path / "out", dit, ae, world.config, world.pose_stats, world.action_model,
                   {"frames": world.start_frames, "deltas": world.start_deltas, "poses": world.start_poses},
                   provenance={})
    assert not (tmp_path / "out").exists()


def test_format_1_world_loads_and_matches(full_dir, v1_dir):
    full, old = World.load(full_dir), World.load(v1_dir)
    assert old.format_version == 1 and old.has_encoder
    np.testing.assert_array_equal(old.start_latents, full.start_latents)  # encoded once at load
    np.testing.assert_array_equal(single_frames(old), single_frames(full))
    np.testing.assert_array_equal(vector_frames(old), vector_frames(full))
    gen = old.generator(1, **CPU)  # the whole autoencoder: frames can still be encoded
    gen.reset(old.start_frames[:1], old.start_deltas[:1])


def test_format_2_files_are_checked(full_dir, tmp_path):
    broken = shutil.copytree(full_dir, tmp_path / "broken")
    (broken / "decoder.safetensors").unlink()
    with pytest.raises(WorldError, match=r"lacks decoder\.safetensors"):
        World.load(broken)
    shutil.copy(full_dir / "decoder.safetensors", broken / "decoder.safetensors")
    with np.load(full_dir / "start_contexts.npz") as d:
        np.savez(broken / "start_contexts.npz", frames=d["frames"], deltas=d["deltas"], poses=d["poses"])
    with pytest.raises(WorldError, match=r"start_contexts\.npz is corrupt or incomplete.*latents"):
        World.load(broken)


def _payload_bytes(path) -> int:
    """A safetensors file's size less its 8-byte length and JSON header: the tensors' bytes."""
    data = path.read_bytes()
    return len(data) - 8 - struct.unpack("<Q", data[:8])[0]


def test_decoder_file_holds_the_decoder_and_latent_scale_only(full_dir):
    world = World.load(full_dir)
    params = Autoencoder(world.config.autoencoder).num_params()
    assert _payload_bytes(full_dir / "decoder.safetensors") == 2 * (params["decoder"] + 1)  # bf16, + latent_scale
    assert _payload_bytes(full_dir / "encoder.safetensors") == 2 * params["encoder"]
    decoder = load_file(str(full_dir / "decoder.safetensors"))
    assert "latent_scale" in decoder and all(k.startswith("decoder.") for k in decoder if k != "latent_scale")


@pytest.mark.parametrize("source", ["full", "v1"])
def test_repack_round_trips(source, full_dir, v1_dir, tmp_path, capsys):
    src = {"full": full_dir, "v1": v1_dir}[source]
    assert main(["repack", str(src), "--out", str(tmp_path / "dst"), "--no-encoder"]) == 0
    assert "decoder.safetensors" in capsys.readouterr().out
    dst = tmp_path / "dst"
    assert sorted(p.name for p in dst.iterdir()) == sorted(
        ["student.safetensors", "student.json", "decoder.safetensors", "decoder.json", "world.json",
         "action_model.json", "start_contexts.npz"])
    a, b = World.load(src), World.load(dst)
    assert b.format_version == 2 and not b.has_encoder
    assert b.provenance["repacked_from"] == {"path": str(src), "format_version": a.format_version}
    np.testing.assert_array_equal(single_frames(a), single_frames(b))
    assert (dst / "student.safetensors").read_bytes() == (full_dir / "student.safetensors").read_bytes()
    # With its encoder, and a second repack of the result: the same again.
    assert main(["repack", str(src), "--out", str(tmp_path / "with")]) == 0
    assert repack(tmp_path / "with", tmp_path / "again").joinpath("encoder.safetensors").is_file()
    np.testing.assert_array_equal(single_frames(World.load(tmp_path / "again")), single_frames(a))
    assert main(["repack", str(src), "--out", str(dst)]) == 2  # never over an existing world
    assert "exists and is not empty" in capsys.readouterr().err


def test_world_with_split_weights_plays_exactly_like_the_whole_one(full_dir, tmp_path, monkeypatch):
    """save_world splits every .safetensors over PART_BYTES (15 MiB: the shipped student); a tiny PART_BYTES
    splits the tiny world's three, and the world loads, plays and repacks as the unsplit one."""
    monkeypatch.setattr(world_module, "PART_BYTES", 50_000)
    split = repack(full_dir, tmp_path / "split")
    for name in ("student", "decoder", "encoder"):
        whole, parts = full_dir / f"{name}.safetensors", part_paths(split / f"{name}.safetensors")
        assert not (split / f"{name}.safetensors").exists() and len(parts) == -(-whole.stat().st_size // 50_000)
        assert b"".join(p.read_bytes() for p in parts) == whole.read_bytes()
    full, world = World.load(full_dir), World.load(split)
    assert world.has_encoder
    np.testing.assert_array_equal(single_frames(world), single_frames(full))
    np.testing.assert_array_equal(vector_frames(world), vector_frames(full))
    # Written again whole and without its encoder: no part of the old files stays behind.
    monkeypatch.undo()
    dit, ae = world.modules()
    starts = {"frames": world.start_frames, "deltas": world.start_deltas, "poses": world.start_poses,
              "latents": world.start_latents}
    save_world(split, dit, ae, world.config, world.pose_stats, world.action_model, starts, world.provenance,
               fps=world.fps, encoder=False)
    assert sorted(p.name for p in split.iterdir()) == sorted(
        ["student.safetensors", "student.json", "decoder.safetensors", "decoder.json", "world.json",
         "action_model.json", "start_contexts.npz"])
    assert (split / "student.safetensors").read_bytes() == (full_dir / "student.safetensors").read_bytes()
    assert not World.load(split).has_encoder
    # A missing part is named when the world loads its networks.
    monkeypatch.setattr(world_module, "PART_BYTES", 50_000)
    broken = repack(full_dir, tmp_path / "broken")
    part_paths(broken / "student.safetensors")[1].unlink()
    with pytest.raises(WorldError, match=r"student\.safetensors is split into parts but .*part001 is missing"):
        World.load(broken).modules()
