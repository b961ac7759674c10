"""Shared by the deployment tests: small untrained policies built from typed configs (no hydra)
with a normaliser fitted to task-like ranges (pixels for PushT: actions ~0-512), their
observations, and a virtual clock with a simulated inference backend for the control loop."""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import OmegaConf

from drifting_policy.checkpoint import write_checkpoint
from drifting_policy.config import compose
from drifting_policy.deploy.control_loop import Chunk
from drifting_policy.nn.normalizer import LinearNormalizer
from drifting_policy.policy import DiffusionConfig, DriftingConfig, make_policy

PUSHT_LOWDIM = {"obs": {"obs": {"shape": [20], "type": "low_dim"}}, "action": {"shape": [2]}}
PUSHT_IMAGE = {"obs": {"image": {"shape": [3, 96, 96], "type": "rgb"},
                       "agent_pos": {"shape": [2], "type": "low_dim"}},
               "action": {"shape": [2]}}
BLOCKPUSH = {"obs": {"obs": {"shape": [16], "type": "low_dim"}}, "action": {"shape": [2]}}
TASKS = {  # shape_meta, (T, To, Ta), value range of low-dim inputs and actions
    "pusht_lowdim": (PUSHT_LOWDIM, (16, 2, 8), 512.0),
    "pusht_image": (PUSHT_IMAGE, (16, 2, 8), 512.0),
    "blockpush": (BLOCKPUSH, (12, 3, 1), 1.0),
}
SMALL = {"down_dims": (16, 32), "diffusion_step_embed_dim": 16, "kernel_size": 3, "n_groups": 4}


def policy(task: str = "pusht_lowdim", kind: str = "drifting", seed: int = 0):
    """An untrained policy of `task`'s shapes (eval mode, CPU) with a fitted normaliser."""
    meta, (t, to, ta), span = TASKS[task]
    torch.manual_seed(seed)
    cls = DriftingConfig if kind == "drifting" else DiffusionConfig
    image = task == "pusht_image"
    extra = {"crop_shape": (84, 84), "feature_dim": 16, "num_kp": 8} if image else {}
    p = make_policy(cls(shape_meta=meta, horizon=t, n_obs_steps=to, n_action_steps=ta,
                        **SMALL, **extra))
    g = torch.Generator().manual_seed(seed + 1)
    norm = LinearNormalizer()
    data = {k: torch.rand(64, *m["shape"], generator=g) * span
            for k, m in meta["obs"].items() if m["type"] == "low_dim"}
    data["action"] = torch.rand(64, *meta["action"]["shape"], generator=g) * span
    norm.fit(data)
    for k, m in meta["obs"].items():
        if m["type"] == "rgb":
            norm.set_image(k)
    p.set_normalizer(norm)
    return p.eval()


def write_task_checkpoint(path, task, p):
    """A training checkpoint of policy `p` whose train config holds the task (as `train` writes
    it): what run / serve / export read."""
    cfg = compose("train_policy", [f"task={task}"])
    train_config = {"task": OmegaConf.to_container(cfg.task, resolve=True),
                    "policy": p.config.to_dict()}
    return write_checkpoint(path, train_config, p)


def observation(p, seed: int = 0) -> dict[str, np.ndarray]:
    """A random observation {key: float32 [To, *shape]} in the normaliser's input ranges."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, m in p.shape_meta["obs"].items():
        x = torch.rand(p.n_obs_steps, *m["shape"], generator=g)
        if m["type"] != "rgb":
            x = x * float(p.normalizer[k].input_stats["max"].max())
        out[k] = x.numpy()
    return out


def batched(obs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """{key: [To, ...]} -> predict_action's {key: [1, To, ...]}."""
    return {k: torch.from_numpy(v)[None] for k, v in obs.items()}


class FakeClock:
    """Virtual time: sleeping jumps to the wake-up time."""

    def __init__(self):
        self.t = 0.0

    def now(self):
        return self.t

    def sleep_until(self, t):
        self.t = max(self.t, t)


class SimulatedInference:
    """The ThreadedInference interface with a virtual latency: the chunk is computed at submit()
    and becomes visible to poll() once the fake clock reaches submit time + latency.
    `seeded`: predict with seed = the observation's tick."""

    def __init__(self, predictor, clock, latency, seeded=False):
        self.predictor, self.clock, self.latency = predictor, clock, latency
        self.seeded = seeded
        self.pending = None

    @property
    def busy(self):
        return self.pending is not None

    def submit(self, tick, obs):
        assert self.pending is None, "submit while busy"
        kw = {"seed": tick} if self.seeded else {}
        chunk = Chunk(tick, self.clock.now(), actions=self.predictor.predict(obs, **kw))
        chunk.ready = chunk.submitted + self.latency
        self.pending = chunk

    def poll(self, wait=False):
        if self.pending is None:
            return []
        if wait:
            self.clock.sleep_until(self.pending.ready)
        if self.pending.ready <= self.clock.now():
            done, self.pending = self.pending, None
            return [done]
        return []
