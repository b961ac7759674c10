"""The Diffusion Policy baseline (Chi et al. 2023) on the same networks as the drifting policy.

DDPM training (epsilon prediction, 100 steps, squaredcos_cap_v2, diffusers' DDPMScheduler);
inference by DDPM with all steps or DDIM with fewer (diffusers' DDIMScheduler, same betas).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler

from drifting_policy.policy.base import ChunkPolicy

SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}


class DiffusionPolicy(ChunkPolicy):
    """ChunkPolicy trained to predict the noise added to expert chunks.

    Args (besides ChunkPolicy's):
        num_train_timesteps, beta_schedule, clip_sample, prediction_type: DDPM training (DP's).
        scheduler: "ddpm" or "ddim" at inference; num_inference_steps: its NFE (DP: 100 / 10-16).
    """

    def __init__(
        self,
        *args,
        num_train_timesteps: int = 100,
        beta_schedule: str = "squaredcos_cap_v2",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        scheduler: str = "ddpm",
        num_inference_steps: int = 100,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if prediction_type not in ("epsilon", "sample"):
            raise ValueError(
                f"prediction_type: expected epsilon or sample, got {prediction_type!r}"
            )
        kw = dict(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                  clip_sample=clip_sample, prediction_type=prediction_type)
        self.train_scheduler = DDPMScheduler(variance_type="fixed_small", **kw)
        self.set_inference(scheduler, num_inference_steps)

    def set_inference(self, scheduler: str, num_inference_steps: int) -> None:
        """Choose the sampler (same weights): "ddpm" or "ddim" with num_inference_steps NFE."""
        n_train = self.train_scheduler.config.num_train_timesteps
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler: expected one of {sorted(SCHEDULERS)}, got {scheduler!r}")
        if not 1 <= num_inference_steps <= n_train:
            raise ValueError(
                f"num_inference_steps: expected 1..{n_train}, got {num_inference_steps}"
            )
        self.inference_scheduler = SCHEDULERS[scheduler].from_config(self.train_scheduler.config)
        self.num_inference_steps = num_inference_steps

    def sample(self, noise, cond, generator=None):
        sched = self.inference_scheduler
        sched.set_timesteps(self.num_inference_steps, device=noise.device)
        x = noise
        for t in sched.timesteps:
            out = self.model(x, t, cond)
            x = sched.step(out, t, x, generator=generator).prev_sample
        return x

    def loss(self, naction, cond):
        noise = torch.randn_like(naction)
        n_steps = self.train_scheduler.config.num_train_timesteps
        t = torch.randint(0, n_steps, (naction.shape[0],), device=naction.device)
        noisy = self.train_scheduler.add_noise(naction, noise, t)
        pred = self.model(noisy, t, cond)
        target = noise if self.train_scheduler.config.prediction_type == "epsilon" else naction
        loss = F.mse_loss(pred, target)
        return loss, {"mse": loss.detach()}
