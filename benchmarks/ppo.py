"""PPO on a Gymnasium vector env of pixel observations with a discrete action space (CleanRL-style, our code).

Used by benchmarks.sim2real to train the same agent inside the world model (`WorldModelVectorEnv`, one
generator call per step for all worlds) and in the real engine (`AsyncVectorEnv` of `DoomRealEnv`).

Episodes are synchronised: one iteration resets every env, plays exactly `episode_steps` steps and
updates. The task is finite-horizon (return = reward of N steps), so no value is bootstrapped past the
last step and no autoreset happens inside a rollout; an env that ends early (the engine ended its episode)
is masked out for the rest of the iteration. The policy sees the current and the previous frame (motion
shows whether it is moving or stuck), downsampled by area averaging.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from envs.collision import downsample

Tensor = torch.Tensor


@dataclass
class PPOConfig:
    episode_steps: int = 200
    """Steps per episode (= rollout length; every iteration is one episode of every env)."""
    obs_size: tuple[int, int] = (48, 64)
    """(h, w) the frames are area-downsampled to before the policy."""
    width: int = 32
    """Channels of the policy CNN."""
    lr: float = 3e-4
    epochs: int = 4
    minibatch: int = 2048
    clip: float = 0.2
    gamma: float = 0.99
    gae_lambda: float = 0.95
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5

    def __post_init__(self):
        if self.episode_steps < 1 or self.epochs < 1 or self.minibatch < 1:
            raise ValueError(f"PPOConfig: episode_steps, epochs and minibatch must be >= 1, got {self}")
        self.obs_size = tuple(int(v) for v in self.obs_size)


class Policy(nn.Module):
    """(prev, current) frames uint8 (B, 6, h, w) -> action logits (B, A), value (B,)."""

    def __init__(self, num_actions: int, obs_size: tuple[int, int] = (48, 64), width: int = 32):
        super().__init__()
        w = width
        self.conv = nn.Sequential(
            nn.Conv2d(6, w, 8, stride=4), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 4, stride=2), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=1), nn.ReLU(), nn.Flatten())
        with torch.no_grad():
            flat = self.conv(torch.zeros(1, 6, *obs_size)).shape[1]
        self.body = nn.Sequential(nn.Linear(flat, 256), nn.ReLU())
        self.pi = nn.Linear(256, num_actions)
        self.v = nn.Linear(256, 1)
        nn.init.orthogonal_(self.pi.weight, 0.01)
        nn.init.zeros_(self.pi.bias)

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(self.conv(obs.float() / 255.0))
        return self.pi(h), self.v(h).squeeze(-1)


def preprocess(frames: np.ndarray | Tensor, size: tuple[int, int], device: torch.device) -> Tensor:
    """uint8 (B, H, W, 3) -> uint8 (B, 3, h, w) on device (area average; H, W multiples of h, w are exact)."""
    return downsample(torch.as_tensor(frames).to(device), size).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def act(policy: Policy, obs: Tensor, generator: torch.Generator | None = None, greedy: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """obs (B, 6, h, w) -> action (B,), its log-prob (B,), value (B,)."""
    logits, value = policy(obs)
    logp_all = torch.log_softmax(logits.float(), -1)
    if greedy:
        a = logp_all.argmax(-1)
    else:
        a = torch.multinomial(logp_all.exp(), 1, generator=generator).squeeze(-1)
    return a, logp_all.gather(-1, a[:, None]).squeeze(-1), value.float()


def play_episode(venv, policy_fn, steps: int, seed: int, size: tuple[int, int], device: torch.device,
                 record: bool = False, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """One synchronised episode of every env: policy_fn(obs (B, 6, h, w), info) -> (action (B,), extras dict of
    (B,) tensors). Returns stacked (T, B, ...) obs, actions, rewards, alive and extras, per-env returns,
    and (record=True) the full-size frames (T+1, B, H, W, 3). options: the vector env's reset options."""
    frames, info = venv.reset(seed=seed, options=options)
    cur = preprocess(frames, size, device)
    prev = cur
    alive = torch.ones(len(cur), dtype=torch.bool, device=device)
    out: dict[str, list] = {"obs": [], "action": [], "reward": [], "alive": []}
    shown = [frames] if record else None
    for _ in range(steps):
        obs = torch.cat([prev, cur], dim=1)
        action, extras = policy_fn(obs, info)
        frames, reward, terminated, truncated, info = venv.step(action.cpu().numpy())
        reward = torch.as_tensor(np.asarray(reward, np.float32), device=device) * alive
        out["obs"].append(obs)
        out["action"].append(action)
        out["reward"].append(reward)
        out["alive"].append(alive.clone())
        for key, val in extras.items():
            out.setdefault(key, []).append(val)
        alive &= ~torch.as_tensor(np.asarray(terminated) | np.asarray(truncated), device=device)
        prev, cur = cur, preprocess(frames, size, device)
        if record:
            shown.append(frames)
    result = {key: torch.stack(vals) for key, vals in out.items()}
    result["returns"] = result["reward"].sum(0)
    if record:
        result["frames"] = np.stack(shown)
    return result


def advantages(reward: Tensor, value: Tensor, alive: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """GAE over (T, B) with the episode ending after step T (or where alive turns False) -> advantages, returns."""
    T = reward.shape[0]
    adv = torch.zeros_like(reward)
    last = torch.zeros_like(reward[0])
    for t in reversed(range(T)):
        nonterminal = alive[t + 1].float() if t + 1 < T else torch.zeros_like(last)
        next_value = value[t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = reward[t] + gamma * next_value * nonterminal - value[t]
        last = delta + gamma * lam * nonterminal * last
        adv[t] = last * alive[t]
    return adv, adv + value


def update(policy: Policy, opt: torch.optim.Optimizer, batch: dict[str, Tensor], cfg: PPOConfig,
           generator: torch.Generator) -> dict[str, float]:
    """PPO-clip epochs over one rollout (T, B, ...) -> mean losses, entropy, approx KL, clip fraction."""
    adv, ret = advantages(batch["reward"], batch["value"], batch["alive"], cfg.gamma, cfg.gae_lambda)
    keep = batch["alive"].flatten()
    obs, action = batch["obs"].flatten(0, 1)[keep], batch["action"].flatten()[keep]
    old_logp, adv, ret = batch["logp"].flatten()[keep], adv.flatten()[keep], ret.flatten()[keep]
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    n = len(obs)
    sums: dict[str, float] = {"pg_loss": 0.0, "v_loss": 0.0, "entropy": 0.0, "approx_kl": 0.0, "clip_frac": 0.0}
    count = 0
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=generator, device="cpu").to(obs.device)
        for start in range(0, n, cfg.minibatch):
            idx = perm[start : start + cfg.minibatch]
            logits, value = policy(obs[idx])
            logp_all = torch.log_softmax(logits.float(), -1)
            logp = logp_all.gather(-1, action[idx, None]).squeeze(-1)
            ratio = (logp - old_logp[idx]).exp()
            pg = -torch.min(ratio * adv[idx], ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv[idx]).mean()
            v_loss = 0.5 * (value.float() - ret[idx]).pow(2).mean()
            entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
            loss = pg + cfg.vf_coef * v_loss - cfg.ent_coef * entropy
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            opt.step()
            with torch.no_grad():
                sums["pg_loss"] += float(pg)
                sums["v_loss"] += float(v_loss)
                sums["entropy"] += float(entropy)
                sums["approx_kl"] += float(((ratio - 1) - (logp - old_logp[idx])).mean())
                sums["clip_frac"] += float(((ratio - 1).abs() > cfg.clip).float().mean())
            count += 1
    return {key: val / max(count, 1) for key, val in sums.items()}


class Trainer:
    """PPO on one vector env, resumable: `state_dict()` holds policy, optimiser, RNG, counters and the curve."""

    def __init__(self, venv, num_actions: int, cfg: PPOConfig, device: torch.device | str, seed: int = 0):
        self.venv, self.cfg, self.device = venv, cfg, torch.device(device)
        torch.manual_seed(seed)
        self.policy = Policy(num_actions, cfg.obs_size, cfg.width).to(self.device)
        self.opt = torch.optim.Adam(self.policy.parameters(), lr=cfg.lr, eps=1e-5)
        self.rng = torch.Generator(self.device).manual_seed(seed)
        self.shuffle = torch.Generator().manual_seed(seed + 1)
        self.seed = seed
        self.iteration = 0
        self.env_steps = 0
        self.train_seconds = 0.0  # wall-clock spent in iterations (collection + update), summed over resumes
        self.curve: list[dict[str, float]] = []
        self.snapshots: list[dict[str, Any]] = []  # policy weights along the way (for evaluating elsewhere)

    def iterate(self) -> dict[str, float]:
        """One episode of every env, then one PPO update -> the iteration's log row."""
        t0 = time.perf_counter()

        def policy_fn(obs, info):
            a, logp, value = act(self.policy, obs, self.rng)
            return a, {"logp": logp, "value": value}

        batch = play_episode(self.venv, policy_fn, self.cfg.episode_steps, seed=self.seed * 100_003 + self.iteration,
                             size=self.cfg.obs_size, device=self.device)
        t_collect = time.perf_counter() - t0
        stats = update(self.policy, self.opt, batch, self.cfg, self.shuffle)
        seconds = time.perf_counter() - t0
        steps = int(batch["alive"].sum())
        self.iteration += 1
        self.env_steps += steps
        self.train_seconds += seconds
        row = {"iteration": self.iteration, "env_steps": self.env_steps, "train_seconds": self.train_seconds,
               "return_mean": float(batch["returns"].mean()), "return_std": float(batch["returns"].std()),
               "env_steps_per_s": steps / t_collect, "steps_per_s": steps / seconds, **stats}
        self.curve.append(row)
        return row

    def snapshot(self) -> None:
        """Keep the current policy in bf16 (half the bytes; evaluation loads it back into fp32 weights)."""
        self.snapshots.append({"env_steps": self.env_steps, "train_seconds": self.train_seconds,
                               "policy": {k: v.detach().to("cpu", torch.bfloat16).clone()
                                          for k, v in self.policy.state_dict().items()}})

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.state_dict(), "opt": self.opt.state_dict(), "rng": self.rng.get_state(),
                "shuffle": self.shuffle.get_state(), "iteration": self.iteration, "env_steps": self.env_steps,
                "train_seconds": self.train_seconds, "curve": self.curve, "snapshots": self.snapshots,
                "cfg": dataclasses.asdict(self.cfg), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["cfg"] != dataclasses.asdict(self.cfg):
            raise ValueError(f"PPO state was trained with {state['cfg']}, not {dataclasses.asdict(self.cfg)}")
        self.policy.load_state_dict(state["policy"])
        self.opt.load_state_dict(state["opt"])
        self.rng.set_state(state["rng"].cpu())  # RNG states are CPU byte tensors, whatever map_location did
        self.shuffle.set_state(state["shuffle"].cpu())
        self.iteration, self.env_steps = state["iteration"], state["env_steps"]
        self.train_seconds, self.curve, self.snapshots = state["train_seconds"], state["curve"], state["snapshots"]
