"""The drifting field and the drift loss — the one core every trainer in this project shares.

Deng et al., "Generative Modeling via Drifting" (arXiv 2602.04770), Alg. 1/2, in the batched form
of the authors' release (drift_loss.py). A generator sample x is attracted to nearby positives
(data) and repelled from nearby negatives (its own samples plus optional extra negatives); the
network regresses onto the frozen target stopgrad(x + V(x)).

Shapes: B independent problems (one per observation, per class label, per feature location),
C samples per set, S feature dimensions.

Two places where the release leaves a degenerate column ill-defined are made exact here (every
column with a positive weight that is not a self-pair is treated exactly as released):
- a self-pair (gen_i with itself) gets affinity 0; the release adds 100 to its distance but its
  affinity floor still leaks sqrt(floor) through, so G = 1 with no negatives would not be
  force-free;
- a column of weight 0 is removed from the row softmax, so weight 0 equals deleting the column
  (the release lets it keep softmax mass).
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist

_DIST_EPS = 1e-8  # floor under squared distances before sqrt
_SCALE_MIN = 1e-3  # floor under the feature / distance scale
_SELF_MASK = 100.0  # added to normalised self-distances (release value)
_LAMBDA_MIN = 1e-8  # floor under the drift magnitude before normalising


def _pairwise_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Euclidean distances [B, N, M] between x [B, N, S] and y [B, M, S] via one batched matmul."""
    sq = (x * x).sum(-1)[:, :, None] + (y * y).sum(-1)[:, None, :] - 2.0 * x @ y.transpose(1, 2)
    return sq.clamp(min=_DIST_EPS).sqrt()


def _global_ratio(num: torch.Tensor, den: torch.Tensor, group) -> torch.Tensor:
    """sum(num) / sum(den) over all ranks of `group`: one all_reduce of the stacked pair."""
    both = torch.stack([num, den]).double()  # float64: exact counts, no cancellation in sums
    torch_dist.all_reduce(both, group=group)
    return (both[0] / both[1]).to(num.dtype)


def _check_set(
    name: str, t: torch.Tensor, batch: int | None, dim: int | None, values: bool
) -> None:
    """Shape checks (free); with `values`, also finiteness (one host sync)."""
    if t.ndim != 3:
        raise ValueError(f"{name}: expected a 3-D tensor [B, C, S], got shape {tuple(t.shape)}")
    if batch is not None and t.shape[0] != batch:
        raise ValueError(f"{name}: expected B = {batch} problems, got shape {tuple(t.shape)}")
    if dim is not None and t.shape[2] != dim:
        raise ValueError(f"{name}: expected S = {dim} feature dims, got shape {tuple(t.shape)}")
    if values and not torch.isfinite(t).all():
        raise ValueError(f"{name}: contains NaN or Inf (shape {tuple(t.shape)})")


def _weights(
    name: str, w: torch.Tensor | None, like: torch.Tensor, values: bool
) -> torch.Tensor:
    """Per-sample weights [B, C] for the set `like` [B, C, S]; ones when w is None."""
    b, c = like.shape[:2]
    if w is None:
        return like.new_ones(b, c, dtype=torch.float32)
    if tuple(w.shape) != (b, c):
        raise ValueError(f"{name}: expected shape {(b, c)}, got {tuple(w.shape)}")
    if values and (not torch.isfinite(w).all() or (w < 0).any()):
        raise ValueError(f"{name}: weights must be finite and >= 0 (shape {tuple(w.shape)})")
    return w.float()


def drift_loss(
    gen: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor | None = None,
    *,
    weight_gen: torch.Tensor | None = None,
    weight_pos: torch.Tensor | None = None,
    weight_neg: torch.Tensor | None = None,
    temperatures: tuple[float, ...] = (0.02, 0.05, 0.2),
    affinity_floor: float = 1e-6,
    attraction_scale: float = 1.0,
    all_reduce: bool = False,
    process_group: torch_dist.ProcessGroup | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Drift loss of generated samples against positives (and optional extra negatives).

    Args:
        gen: generated samples [B, Cg, S]; gradients flow to it. Cg >= 1.
        pos: positive (data) samples [B, Cp, S], Cp >= 1; no gradient.
        neg: extra negative samples [B, Cn, S] or None; no gradient. The generated samples are
            always negatives of each other (self-pairs masked).
        weight_gen, weight_pos, weight_neg: per-sample weights [B, Cg] / [B, Cp] / [B, Cn], >= 0
            (default 1). They weight each sample as a target column; 0 removes the column.
        temperatures: kernel temperatures R on normalised distances; one normalised force each.
        affinity_floor: minimum of the two-way softmax product before the square root (release:
            1e-6). Use 0 with many samples per problem (see toy.py).
        attraction_scale: multiplies the attraction; 1 keeps V anti-symmetric. Anything else is
            the paper's destructive ablation.
        all_reduce: data parallelism. The two global statistics (the feature scale and each
            lambda_R) become sums all-reduced over the ranks of `process_group` (default: the
            world), so N ranks holding disjoint slices of the B problems compute exactly what one
            process computes on all of them (same Cg and S on every rank; callers average the
            per-problem loss over equal-sized slices, as DDP's gradient mean then matches).
            Requires an initialised torch.distributed; False keeps everything rank-local.
        process_group: the group to reduce over when all_reduce (None: the default group).
        validate: also check the values (finite samples; finite, non-negative weights; a positive
            weight in every row), which costs a device-to-host sync per check. Shapes and
            arguments are always checked. Callers that validate their inputs once and call
            drift_loss many times per step (image_gen's features) pass False: the function then
            has no data-dependent branch and never syncs.

    Returns:
        loss: [B] float32, mean over (Cg, S) of (gen / s - goal)^2 with goal frozen.
        info: detached float32 scalars: "scale" (mean weighted distance) and "lambda/<R>" (mean
            squared un-normalised force per temperature — watch these fall, not the loss).
    """
    _check_set("gen", gen, None, None, validate)
    b, cg, s = gen.shape
    _check_set("pos", pos, b, s, validate)
    if neg is None:
        neg = gen.new_zeros(b, 0, s)
    _check_set("neg", neg, b, s, validate)
    if cg == 0:
        raise ValueError(f"gen: needs at least one generated sample, got shape {tuple(gen.shape)}")
    if pos.shape[1] == 0:
        raise ValueError(f"pos: the positive set is empty, got shape {tuple(pos.shape)}")
    if not temperatures or any(r <= 0 for r in temperatures):
        raise ValueError(f"temperatures: expected positive values, got {tuple(temperatures)}")
    if affinity_floor < 0:
        raise ValueError(f"affinity_floor: expected >= 0, got {affinity_floor}")
    if all_reduce and not (torch_dist.is_available() and torch_dist.is_initialized()):
        raise ValueError("all_reduce: expected an initialised torch.distributed process group, "
                         "got none (call torch.distributed.init_process_group first)")

    w_target = torch.cat(
        [
            _weights("weight_gen", weight_gen, gen, validate),
            _weights("weight_neg", weight_neg, neg, validate),
            _weights("weight_pos", weight_pos, pos, validate),
        ],
        dim=1,
    )  # [B, T] with T = Cg + Cn + Cp, columns ordered (gen, neg, pos)
    if validate and (w_target[:, cg + neg.shape[1] :].sum(1) == 0).any():
        raise ValueError(f"weight_pos: every problem needs a positive weight, got all-zero rows "
                         f"(shape {tuple(weight_pos.shape)})")

    with torch.autocast(device_type=gen.device.type, enabled=False):
        gen = gen.float()
        with torch.no_grad():
            x = gen.detach()
            targets = torch.cat([x, neg.float(), pos.float()], dim=1)  # [B, T, S]
            n_neg_cols = cg + neg.shape[1]

            # Feature normalisation: one scalar over the whole batch makes temperatures unit-free.
            dist = _pairwise_dist(x, targets)  # [B, Cg, T]
            if all_reduce:  # mean(dist * w) / mean(w) over the B of all ranks together
                scale = _global_ratio((dist * w_target[:, None, :]).sum(),
                                      cg * w_target.sum(), process_group)
            else:
                scale = (dist * w_target[:, None, :]).mean() / w_target.mean()
            s_in = (scale / s**0.5).clamp(min=_SCALE_MIN)  # coordinate scale
            dist_normed = dist / scale.clamp(min=_SCALE_MIN)
            x_scaled, targets_scaled = x / s_in, targets / s_in

            # Self-mask: a generated sample never pairs with itself.
            self_pair = torch.zeros(cg, dist.shape[2], dtype=torch.bool, device=gen.device)
            self_pair[:, :cg] = torch.eye(cg, dtype=torch.bool, device=gen.device)
            dist_normed = dist_normed + _SELF_MASK * self_pair
            # Column weights with self-pairs zeroed; weight-0 columns leave the row softmax.
            w_pair = w_target[:, None, :] * ~self_pair  # [B, Cg, T]
            absent = (w_target == 0)[:, None, :]

            goal = x_scaled.clone()
            info: dict[str, torch.Tensor] = {"scale": scale}
            for r in temperatures:
                logits = -dist_normed / r
                # Two-way softmax: over targets (rows) and over generated samples (columns).
                row = logits.masked_fill(absent, torch.finfo(logits.dtype).min).softmax(dim=2)
                col = logits.softmax(dim=1)
                aff = (row * col).clamp(min=affinity_floor).sqrt() * w_pair  # [B, Cg, T]
                aff_neg, aff_pos = aff[:, :, :n_neg_cols], aff[:, :, n_neg_cols:]
                # Repel from each negative in proportion to the total attraction, and vice versa.
                coef = torch.cat(
                    [
                        -aff_neg * aff_pos.sum(-1, keepdim=True),
                        attraction_scale * aff_pos * aff_neg.sum(-1, keepdim=True),
                    ],
                    dim=2,
                )
                force = coef @ targets_scaled - coef.sum(-1, keepdim=True) * x_scaled
                if all_reduce:  # mean over the forces of all ranks together
                    lam = _global_ratio((force**2).sum(), force.new_tensor(force.numel()),
                                        process_group)
                else:
                    lam = (force**2).mean()
                info[f"lambda/{r}"] = lam
                # Drift normalisation: each temperature contributes a unit-RMS force.
                goal = goal + force / lam.clamp(min=_LAMBDA_MIN).sqrt()

        loss = ((gen / s_in - goal) ** 2).mean(dim=(1, 2))
    return loss, info


def drift_field(
    x: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None, tau: float
) -> torch.Tensor:
    """Un-normalised drifting field V(x) = V+(x) - V-(x) with kernel k(x, y) = exp(-|x - y| / tau).

    V+(x) = sum_j k(x, pos_j) pos_j / sum_j k(x, pos_j) - x, and likewise V-(x) for neg, so
    V = (kernel mean of pos) - (kernel mean of neg). Anti-symmetric in (pos, neg); zero when the two
    sets are equal. An empty or absent negative set repels nothing (V- = 0).

    Args:
        x: query points [N, S]. pos: [P, S] with P >= 1. neg: [M, S] or None. tau > 0.

    Returns:
        V: [N, S] in the dtype of x (computed in at least float32).
    """
    for name, t in (("x", x), ("pos", pos)) + ((("neg", neg),) if neg is not None else ()):
        if t.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D tensor [N, S], got shape {tuple(t.shape)}")
        if t.shape[1] != x.shape[1]:
            raise ValueError(
                f"{name}: expected S = {x.shape[1]} (from x), got shape {tuple(t.shape)}"
            )
        if not torch.isfinite(t).all():
            raise ValueError(f"{name}: contains NaN or Inf (shape {tuple(t.shape)})")
    if pos.shape[0] == 0:
        raise ValueError(f"pos: the positive set is empty, got shape {tuple(pos.shape)}")
    if tau <= 0:
        raise ValueError(f"tau: expected > 0, got {tau}")

    dtype = torch.promote_types(x.dtype, torch.float32)  # at least float32

    def kernel_mean(y: torch.Tensor) -> torch.Tensor:
        k = (-_pairwise_dist(x[None].to(dtype), y[None].to(dtype))[0] / tau).softmax(dim=1)
        return k @ y.to(dtype)  # [N, S]

    v = kernel_mean(pos)
    if neg is not None and neg.shape[0] > 0:
        v = v - kernel_mean(neg)
    else:
        v = v - x.to(dtype)
    return v.to(x.dtype)
