"""The one-step Drifting Policy (Deng et al. 2026, sec. 5.3): one network pass per action chunk.

Training: for each observation the generator maps G independent noise chunks (same conditioning,
step input 0) to G action chunks; `drift_loss` attracts them to the expert chunk (the one positive)
and repels them from each other. Inference: one forward pass from fresh noise.
"""

from __future__ import annotations

import torch

from drifting_policy.drift import drift_loss
from drifting_policy.policy.base import ChunkPolicy
from drifting_policy.policy.configs import DriftingConfig

GROUPINGS = ("per_timestep", "per_dim", "flat")
NORMALIZATIONS = ("per_group", "global")


def chunk_drift_loss(
    x: torch.Tensor,
    naction: torch.Tensor,
    *,
    grouping: str = "per_timestep",
    normalize: str = "per_group",
    temperatures: tuple[float, ...] = (0.02, 0.05, 0.2),
    affinity_floor: float = 1e-6,
    pad_mask: torch.Tensor | None = None,
    all_reduce: bool = False,
    validate: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Drift loss of G generated action chunks per observation against the expert chunk.

    The chunk is split into groups of drift problems, each observation's expert chunk being the
    one positive and its G chunks the generated set:
    - "per_timestep": one group per step t, problems [B, G, Da] (the Diffusion Policy fork that
      reproduces the paper's Table 7; DBPO);
    - "per_dim": one group per action dimension d, problems [B, G, T] (the LeRobot drifting
      VLAs);
    - "flat": one group, problems [B, G, T * Da].
    normalize="per_group" computes the feature scale and each temperature's lambda per group,
    exactly as one drift_loss call per group would (the published semantics); "global" shares
    them across all groups (one call on all problems). Either way it is one batched drift_loss
    call, no loop over groups.

    Args:
        x: generated chunks [B, G, T, Da] (normalised actions); gradients flow to it.
        naction: expert chunks [B, T, Da].
        grouping, normalize: see above.
        temperatures, affinity_floor: passed to drift_loss.
        pad_mask: bool [B, T], True at padded steps (LeRobot's action_is_pad), or None. Padded
            steps take no part: per_timestep drops their problems (from the loss and from every
            statistic); per_dim / flat zero the padded steps in both x and naction, so they add
            nothing to distances, forces or the loss (S, hence the coordinate scale, still
            counts them). Each chunk's first step must be real.
        all_reduce, validate: passed to drift_loss (data parallelism: the statistics over every
            rank's observations; value checks, a host sync each).

    Returns:
        loss: scalar, the mean over groups of the mean over the (unpadded) problems of the group;
            float32 (float64 for float64 inputs).
        info: detached scalars "scale" and "lambda/<R>" (per-group values averaged over groups).
    """
    if x.ndim != 4:
        raise ValueError(f"x: expected generated chunks [B, G, T, Da], got shape {tuple(x.shape)}")
    b, g, t, da = x.shape
    if tuple(naction.shape) != (b, t, da):
        raise ValueError(f"naction: expected shape {(b, t, da)} ([B, T, Da] of x "
                         f"{tuple(x.shape)}), got {tuple(naction.shape)}")
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping: expected one of {GROUPINGS}, got {grouping!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize: expected one of {NORMALIZATIONS}, got {normalize!r}")
    if pad_mask is not None and (pad_mask.dtype != torch.bool or tuple(pad_mask.shape) != (b, t)):
        raise ValueError(f"pad_mask: expected a bool tensor of shape {(b, t)}, got "
                         f"{pad_mask.dtype} {tuple(pad_mask.shape)}")

    valid = None
    if grouping == "per_timestep":  # row t * B + b: group t holds every observation's step t
        gen = x.permute(2, 0, 1, 3).reshape(t * b, g, da)
        pos = naction.transpose(0, 1).reshape(t * b, 1, da)
        if pad_mask is not None:
            valid = ~pad_mask.transpose(0, 1).reshape(t * b)
    else:
        if pad_mask is not None:
            keep = (~pad_mask).to(x.dtype)[:, :, None]  # [B, T, 1]
            x, naction = x * keep[:, None], naction * keep.to(naction.dtype)
        if grouping == "per_dim":  # row d * B + b: group d holds every observation's dim d
            gen = x.permute(3, 0, 1, 2).reshape(da * b, g, t)
            pos = naction.permute(2, 0, 1).reshape(da * b, 1, t)
        else:
            gen, pos = x.reshape(b, g, t * da), naction.reshape(b, 1, t * da)
    n_groups = gen.shape[0] // b
    loss, info = drift_loss(
        gen, pos, temperatures=temperatures, affinity_floor=affinity_floor,
        groups=n_groups if normalize == "per_group" else 1, valid=valid, all_reduce=all_reduce,
        validate=validate,
    )
    per_group = loss.reshape(n_groups, b)
    if valid is None:
        return per_group.mean(), info
    count = valid.reshape(n_groups, b).sum(1)
    group_mean = per_group.sum(1) / count.clamp(min=1)
    return group_mean.sum() / (count > 0).sum().clamp(min=1), info


class DriftingPolicy(ChunkPolicy):
    """ChunkPolicy trained with the drift loss (config: `DriftingConfig`).

    Each observation's G generated chunks form the generated set and its expert chunk the one
    positive; `config.grouping` / `config.normalize` decide how the chunk is split into drift
    problems (see `chunk_drift_loss`).
    """

    config_class = DriftingConfig
    # Switches of the drift loss at training time, set by the trainer (not part of the config):
    # under DDP the statistics are all-reduced over the ranks (only in train mode, so a rank-0
    # validation pass never waits for the others), and the value checks cost a host sync.
    all_reduce_drift: bool = False
    validate_drift: bool = True

    def sample(self, noise, cond, generator=None):
        return self.model(noise, 0, cond)

    def loss(self, naction, cond):
        b, t, da = naction.shape
        c, g = self.config, self.config.gen_per_obs
        noise = torch.randn(b * g, t, da, device=naction.device, dtype=naction.dtype)
        x = self.model(noise, 0, cond.repeat_interleave(g, dim=0)).reshape(b, g, t, da)
        return chunk_drift_loss(x, naction, grouping=c.grouping, normalize=c.normalize,
                                temperatures=c.temperatures, affinity_floor=c.affinity_floor,
                                all_reduce=self.all_reduce_drift and self.training,
                                validate=self.validate_drift)
