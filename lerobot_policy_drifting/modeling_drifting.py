"""``DriftingPolicy``: LeRobot's policy API around this project's one-step drifting policy.

The networks (observation encoder, ConditionalUnet1D), the generation step and the chunk drift
loss are ``drifting_policy``'s, imported: ``self.core`` is a ``drifting_policy`` DriftingPolicy
built from ``config.core_config()``. Batches arrive normalised by the pre-processor, so the
core's own normaliser is the identity on states and actions and maps images [0, 1] -> [-1, 1].

Training (``forward``): batch ``observation.*`` [B, To, ...], ``action`` [B, T, Da] and
``action_is_pad`` [B, T] -> G generated chunks per observation, drift loss against the expert
chunk with padded steps left out of the drift problems (``chunk_drift_loss(pad_mask=...)``).
Inference: ``select_action`` keeps the last To observations and, when its action queue is
empty, runs ``predict_action_chunk``: one network pass -> Ta actions [B, Ta, Da].
"""

from __future__ import annotations

from collections import deque

import torch
from lerobot.policies.pretrained import PreTrainedPolicy
from lerobot.policies.utils import populate_queues
from torch import Tensor

from drifting_policy.policy import make_policy
from drifting_policy.policy.drifting import chunk_drift_loss
from lerobot_policy_drifting.configuration_drifting import DriftingConfig, core_key

ACTION = "action"


class DriftingPolicy(PreTrainedPolicy):
    config_class = DriftingConfig
    name = "drifting"

    def __init__(self, config: DriftingConfig, **kwargs) -> None:
        super().__init__(config)
        config.validate_features()
        self.config = config
        self.core = make_policy(config.core_config())
        for key, meta in self.core.shape_meta["obs"].items():
            if meta["type"] == "rgb":
                self.core.normalizer.set_image(key)
            else:
                self.core.normalizer.set_identity(key, meta["shape"][0])
        self.core.normalizer.set_identity("action", self.core.action_dim)
        self._queues: dict[str, deque] = {}
        self.reset()

    def get_optim_params(self) -> dict:
        return self.core.parameters()

    def reset(self) -> None:
        """Clear the observation and action queues (call on env.reset())."""
        self._queues = {key: deque(maxlen=self.config.n_obs_steps)
                        for key in self.config.input_features}
        self._queues[ACTION] = deque(maxlen=self.config.n_action_steps)

    def _obs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """{feature: [B, To, ...]} -> the core's {key: [B, To, ...]}."""
        obs = {}
        for key in self.config.input_features:
            if key not in batch:
                raise ValueError(f"drifting: batch lacks input feature '{key}'; has "
                                 f"{sorted(batch)}")
            obs[core_key(key)] = batch[key]
        return obs

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
        """Training loss: one drift problem set per observation (see module docstring)."""
        core, cfg = self.core, self.core.config
        naction = batch[ACTION]
        expected = (cfg.horizon, core.action_dim)
        if naction.ndim != 3 or tuple(naction.shape[1:]) != expected:
            raise ValueError(f"batch['action']: expected [B, {expected[0]}, {expected[1]}], got "
                             f"{tuple(naction.shape)}")
        cond = core._encode(core._check_obs(self._obs(batch)))
        b, g = naction.shape[0], cfg.gen_per_obs
        noise = torch.randn(b * g, *expected, device=cond.device, dtype=cond.dtype)
        x = core.sample(noise, cond.repeat_interleave(g, dim=0)).reshape(b, g, *expected)
        pad = batch.get("action_is_pad")
        loss, info = chunk_drift_loss(
            x, naction.to(x.dtype), grouping=cfg.grouping, normalize=cfg.normalize,
            temperatures=cfg.temperatures, affinity_floor=cfg.affinity_floor,
            pad_mask=None if pad is None else pad.to(torch.bool),
        )
        return loss, {k.replace("/", "_"): float(v) for k, v in info.items()}

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Tensor], **kwargs) -> Tensor:
        """The queued last To observations (see ``select_action``) -> [B, Ta, Da] normalised
        actions from one network pass (``config.n_samples`` > 1: that many candidates in the
        same pass, the ``config.select`` one returned)."""
        stacked = {k: torch.stack(list(self._queues[k]), dim=1) for k in self.config.input_features}
        return self.core.predict_action(self._obs(stacked), n_samples=self.config.n_samples,
                                        select=self.config.select)["action"]

    @torch.no_grad()
    def select_action(self, batch: dict[str, Tensor], **kwargs) -> Tensor:
        """batch {feature: [B, ...]} of the current step -> the next action [B, Da]; a new chunk
        (one network pass) every Ta steps. The first observation fills all To slots."""
        batch = {k: v for k, v in batch.items() if k != ACTION}
        self._queues = populate_queues(self._queues, batch)
        if not self._queues[ACTION]:
            self._queues[ACTION].extend(self.predict_action_chunk(batch).transpose(0, 1))
        return self._queues[ACTION].popleft()
