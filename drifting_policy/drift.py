"""The drifting field and the drift loss — the one core every trainer in this project shares.

Deng et al., "Generative Modeling via Drifting" (arXiv 2602.04770), Alg. 1/2, in the batched form
of the authors' release (drift_loss.py). A generator sample x is attracted to nearby positives
(data) and repelled from nearby negatives (its own samples plus optional extra negatives); the
network regresses onto the frozen target stopgrad(x + V(x)).

Shapes: B independent problems (one per observation, per class label, per feature location),
C samples per set, S feature dimensions.

By default every column is treated exactly as released, degenerate ones included:
- the self-pair (gen_i with itself) has 100 added to its normalised distance, but the affinity
  floor still gives it sqrt(floor) (1e-3 at the release's 1e-6), which enters rowsum(A_neg) and
  so scales every attraction; with G = 1 and no negatives this self column is the only
  "repulsion" and the force is a (normalised) pull towards the positives;
- a column of weight 0 gets affinity 0 but keeps its share of the row softmax.
`exact_degenerate=True` makes both exact instead: self-pairs get affinity 0 (G = 1 without
negatives is then force-free) and a weight-0 column leaves the row softmax (weight 0 equals
deleting the column).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

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


@contextmanager
def _ieee_matmuls():
    """CUDA float32 matmuls in full precision (no TF32) inside; the caller's setting is restored.

    |x|^2 + |y|^2 - 2 x.y cancels badly for near neighbours, and TF32's 10-bit mantissa in x.y
    would swamp exactly the small distances the kernel cares about.
    """
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = saved


def _group_ratio(
    num: torch.Tensor, den: torch.Tensor, groups: int, reduce: bool, process_group
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group sum(num) / sum(den) [groups] from per-problem terms [B] (0 where sum(den) = 0),
    and whether sum(den) > 0 [groups].

    With `reduce`, the sums are all-reduced over the ranks of `process_group` first (float64:
    exact counts, no cancellation)."""
    both = torch.stack([num.reshape(groups, -1).sum(1), den.reshape(groups, -1).sum(1)])
    if reduce:
        both = both.double()
        torch_dist.all_reduce(both, group=process_group)
    present = both[1] > 0
    ratio = both[0] / both[1].clamp(min=torch.finfo(both.dtype).tiny)
    return torch.where(present, ratio, 0.0).to(num.dtype), present


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
    name: str, w: torch.Tensor | None, like: torch.Tensor, dtype: torch.dtype, values: bool
) -> torch.Tensor:
    """Per-sample weights [B, C] for the set `like` [B, C, S]; ones when w is None."""
    b, c = like.shape[:2]
    if w is None:
        return like.new_ones(b, c, dtype=dtype)
    if tuple(w.shape) != (b, c):
        raise ValueError(f"{name}: expected shape {(b, c)}, got {tuple(w.shape)}")
    if values and (not torch.isfinite(w).all() or (w < 0).any()):
        raise ValueError(f"{name}: weights must be finite and >= 0 (shape {tuple(w.shape)})")
    return w.to(dtype)


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
    exact_degenerate: bool = False,
    groups: int = 1,
    valid: torch.Tensor | None = None,
    attraction_scale: float = 1.0,
    all_reduce: bool = False,
    process_group: torch_dist.ProcessGroup | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Drift loss of generated samples against positives (and optional extra negatives).

    Computed in float32 (float64 inputs: float64), outside any autocast region and with CUDA
    matmuls in full float32 precision (no TF32), whatever the caller's settings.

    Args:
        gen: generated samples [B, Cg, S]; gradients flow to it. Cg >= 1.
        pos: positive (data) samples [B, Cp, S], Cp >= 1; no gradient.
        neg: extra negative samples [B, Cn, S] or None; no gradient. The generated samples are
            always negatives of each other (self-pairs masked).
        weight_gen, weight_pos, weight_neg: per-sample weights [B, Cg] / [B, Cp] / [B, Cn], >= 0
            (default 1). They weight each sample as a target column.
        temperatures: kernel temperatures R on normalised distances; one normalised force each.
        affinity_floor: minimum of the two-way softmax product before the square root (release:
            1e-6). Use 0 with many samples per problem (see toy.py).
        exact_degenerate: False (default) reproduces the release for every column; True gives
            self-pairs affinity 0 and removes weight-0 columns from the row softmax (module
            docstring).
        groups: the B problems form `groups` equal contiguous blocks (problem b is in block
            b // (B / groups)). The feature scale and each lambda_R are computed per block, so
            the result equals `groups` separate calls on the blocks, concatenated.
        valid: bool [B] or None (all valid). A False problem is excluded as if it were absent:
            loss 0, no gradient, no part in any statistic, its weights not validated.
        attraction_scale: multiplies the attraction; 1 keeps V anti-symmetric. Anything else is
            the paper's destructive ablation.
        all_reduce: data parallelism. The global statistics (the feature scale and each
            lambda_R, per block) become sums all-reduced over the ranks of `process_group`
            (default: the world), so N ranks holding disjoint slices of the B problems compute
            exactly what one process computes on all of them (same Cg, S and `groups` on every
            rank, each rank's blocks being its slices of the global blocks; callers average the
            per-problem loss over equal-sized slices, as DDP's gradient mean then matches).
            Requires an initialised torch.distributed; False keeps everything rank-local.
        process_group: the group to reduce over when all_reduce (None: the default group).
        validate: also check the values (finite samples; finite, non-negative weights; a positive
            weight in every valid row), which costs a device-to-host sync per check. Shapes and
            arguments are always checked. Callers that validate their inputs once and call
            drift_loss many times per step (image_gen's features) pass False: the function then
            has no data-dependent branch and never syncs.

    Returns:
        loss: [B], mean over (Cg, S) of (gen / s - goal)^2 with goal frozen; 0 where not valid.
        info: detached scalars: "scale" (mean weighted distance) and "lambda/<R>" (mean squared
            un-normalised force per temperature — watch these fall, not the loss); with several
            blocks, the mean over the blocks that hold a valid problem.
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
    if groups < 1 or b % groups:
        raise ValueError(f"groups: expected a divisor of B = {b} (gen shape {tuple(gen.shape)}), "
                         f"got {groups}")
    if valid is not None and (valid.dtype != torch.bool or tuple(valid.shape) != (b,)):
        raise ValueError(f"valid: expected a bool tensor of shape {(b,)}, got {valid.dtype} "
                         f"{tuple(valid.shape)}")
    if all_reduce and not (torch_dist.is_available() and torch_dist.is_initialized()):
        raise ValueError("all_reduce: expected an initialised torch.distributed process group, "
                         "got none (call torch.distributed.init_process_group first)")

    dtype = torch.promote_types(gen.dtype, torch.float32)  # bf16/fp16 -> float32
    live = gen.new_ones(b, dtype=dtype) if valid is None else valid.to(dtype)  # [B]
    w_target = torch.cat(
        [
            _weights("weight_gen", weight_gen, gen, dtype, validate),
            _weights("weight_neg", weight_neg, neg, dtype, validate),
            _weights("weight_pos", weight_pos, pos, dtype, validate),
        ],
        dim=1,
    )  # [B, T] with T = Cg + Cn + Cp, columns ordered (gen, neg, pos)
    n_neg_cols = cg + neg.shape[1]
    if validate and ((w_target[:, n_neg_cols:].sum(1) == 0) & (live > 0)).any():
        raise ValueError(f"weight_pos: every problem needs a positive weight, got all-zero rows "
                         f"(shape {tuple(weight_pos.shape)})")

    device_type = gen.device.type
    no_autocast = torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(
        device_type) else nullcontext()  # e.g. the meta device has no autocast
    with no_autocast, _ieee_matmuls():
        gen = gen.to(dtype)
        with torch.no_grad():
            x = gen.detach()
            targets = torch.cat([x, neg.to(dtype), pos.to(dtype)], dim=1)  # [B, T, S]

            def per_problem(stat: torch.Tensor) -> torch.Tensor:
                """Block statistic [groups] -> [B, 1, 1]."""
                return stat.repeat_interleave(b // groups)[:, None, None]

            # Feature normalisation: the mean weighted distance of each block makes the
            # temperatures unit-free; mean(dist * w) / mean(w) = sum(dist * w) / (Cg * sum(w)).
            dist = _pairwise_dist(x, targets)  # [B, Cg, T]
            scale, seen = _group_ratio((dist * w_target[:, None, :]).sum((1, 2)) * live,
                                       cg * w_target.sum(1) * live, groups, all_reduce,
                                       process_group)
            n_seen = seen.sum().clamp(min=1)  # blocks with a valid problem
            s_in = per_problem((scale / s**0.5).clamp(min=_SCALE_MIN))  # coordinate scale
            dist_normed = dist / per_problem(scale.clamp(min=_SCALE_MIN))
            x_scaled, targets_scaled = x / s_in, targets / s_in

            # Self-mask: a generated sample never pairs with itself.
            self_pair = torch.zeros(cg, dist.shape[2], dtype=torch.bool, device=gen.device)
            self_pair[:, :cg] = torch.eye(cg, dtype=torch.bool, device=gen.device)
            dist_normed = dist_normed + _SELF_MASK * self_pair
            w_pair = w_target[:, None, :]  # [B, 1, T]
            absent = None
            if exact_degenerate:  # self-pairs get 0; weight-0 columns leave the row softmax
                w_pair = w_pair * ~self_pair
                absent = (w_target == 0)[:, None, :]

            goal = x_scaled.clone()
            info: dict[str, torch.Tensor] = {"scale": scale.sum() / n_seen}
            for r in temperatures:
                logits = -dist_normed / r
                # Two-way softmax: over targets (rows) and over generated samples (columns).
                row_logits = logits if absent is None else logits.masked_fill(
                    absent, torch.finfo(dtype).min)
                row, col = row_logits.softmax(dim=2), logits.softmax(dim=1)
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
                lam, _ = _group_ratio((force**2).sum((1, 2)) * live, cg * s * live, groups,
                                      all_reduce, process_group)
                info[f"lambda/{r}"] = lam.sum() / n_seen
                # Drift normalisation: each temperature contributes a unit-RMS force per block.
                goal = goal + force / per_problem(lam.clamp(min=_LAMBDA_MIN).sqrt())

        loss = ((gen / s_in - goal) ** 2).mean(dim=(1, 2)) * live
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
