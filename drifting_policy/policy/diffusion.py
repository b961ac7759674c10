"""The Diffusion Policy baseline (Chi et al. 2023) on the same networks as the drifting policy.

DDPM training (epsilon prediction, 100 steps, squaredcos_cap_v2, diffusers' DDPMScheduler);
inference by DDPM with all steps or DDIM with fewer (diffusers' DDIMScheduler, same betas).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler

from drifting_policy.policy.base import ChunkPolicy
from drifting_policy.policy.configs import DiffusionConfig

SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}


class DiffusionPolicy(ChunkPolicy):
    """ChunkPolicy trained to predict the noise added to expert chunks (config: `DiffusionConfig`:
    DDPM training as in Diffusion Policy; DDPM or DDIM sampling with num_inference_steps NFE)."""

    config_class = DiffusionConfig

    def __init__(self, config: DiffusionConfig) -> None:
        super().__init__(config)
        self.train_scheduler = DDPMScheduler(
            num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
            clip_sample=config.clip_sample, prediction_type=config.prediction_type,
            variance_type="fixed_small",
        )
        self.set_inference(config.scheduler, config.num_inference_steps)

    def set_inference(self, scheduler: str, num_inference_steps: int) -> None:
        """Choose the sampler (same weights): "ddpm" or "ddim" with num_inference_steps NFE;
        the config follows, so a saved policy keeps the sampler."""
        self.config = dataclasses.replace(self.config, scheduler=scheduler,
                                          num_inference_steps=num_inference_steps)
        self.inference_scheduler = SCHEDULERS[scheduler].from_config(self.train_scheduler.config)
        self.num_inference_steps = num_inference_steps

    def sample(self, noise, cond, generator=None):
        """The denoising loop. Timesteps stay on the CPU: the UNet fills them in on the device
        and the scheduler indexes its CPU tables with them, so no step waits for the device.
        The scheduler's noise is drawn on `generator`'s device (a CPU generator gives the same
        noise whatever the policy's device)."""
        sched = self.inference_scheduler
        sched.set_timesteps(self.num_inference_steps)
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
