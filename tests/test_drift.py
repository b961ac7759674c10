"""The drift core against an independent per-element float64 computation, and its properties."""

import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from drifting_policy.drift import drift_field, drift_loss


def naive_goal(gen, pos, neg, w_gen, w_pos, w_neg, temps, floor):
    """drifting.md section 1 written out element by element in float64 (lists of rows).

    Returns (goal [B,Cg,S] in scaled coordinates, s_in, scale, lambdas).
    """
    gen, pos, neg = (np.asarray(a, dtype=np.float64) for a in (gen, pos, neg))
    b_n, cg, s = gen.shape
    targets = np.concatenate([gen, neg, pos], axis=1)
    w = np.concatenate([w_gen, w_neg, w_pos], axis=1).astype(np.float64)
    t_n = targets.shape[1]
    n_negcols = cg + neg.shape[1]
    dist = np.zeros((b_n, cg, t_n))
    for b in range(b_n):
        for i in range(cg):
            for j in range(t_n):
                x, y = gen[b, i], targets[b, j]
                sq = sum(x[k] ** 2 + y[k] ** 2 - 2 * x[k] * y[k] for k in range(s))
                dist[b, i, j] = math.sqrt(max(sq, 1e-8))
    num = sum(dist[b, i, j] * w[b, j] for b in range(b_n) for i in range(cg) for j in range(t_n))
    scale = (num / (b_n * cg * t_n)) / (w.sum() / (b_n * t_n))
    s_in = max(scale / math.sqrt(s), 1e-3)
    dn = dist / max(scale, 1e-3)
    for i in range(cg):
        dn[:, i, i] += 100.0
    goal = gen / s_in
    lambdas = []
    for r in temps:
        force = np.zeros_like(gen)
        for b in range(b_n):
            logit = -dn[b] / r
            aff = np.zeros((cg, t_n))
            for i in range(cg):
                present = [j for j in range(t_n) if w[b, j] > 0]
                zr = sum(math.exp(logit[i, k]) for k in present)
                for j in range(t_n):
                    if w[b, j] == 0 or j == i:  # removed column / self-pair
                        continue
                    zc = sum(math.exp(logit[k, j]) for k in range(cg))
                    p = math.exp(logit[i, j]) / zr * math.exp(logit[i, j]) / zc
                    aff[i, j] = math.sqrt(max(p, floor)) * w[b, j]
            for i in range(cg):
                sum_pos = aff[i, n_negcols:].sum()
                sum_neg = aff[i, :n_negcols].sum()
                for j in range(t_n):
                    c = -aff[i, j] * sum_pos if j < n_negcols else aff[i, j] * sum_neg
                    force[b, i] += c * (targets[b, j] - gen[b, i]) / s_in
        lam = float((force**2).mean())
        lambdas.append(lam)
        goal = goal + force / math.sqrt(max(lam, 1e-8))
    return goal, s_in, scale, lambdas


def _problem(seed=0, b=2, cg=5, cp=3, cn=2, s=3):
    g = torch.Generator().manual_seed(seed)
    gen = torch.randn(b, cg, s, generator=g, dtype=torch.float64)
    pos = torch.randn(b, cp, s, generator=g, dtype=torch.float64) + 0.5
    neg = torch.randn(b, cn, s, generator=g, dtype=torch.float64) - 0.5
    wg = torch.rand(b, cg, generator=g, dtype=torch.float64) + 0.5
    wp = torch.rand(b, cp, generator=g, dtype=torch.float64) + 0.5
    wn = torch.rand(b, cn, generator=g, dtype=torch.float64) + 0.5
    return gen, pos, neg, wg, wp, wn


@pytest.mark.parametrize("floor", [1e-6, 0.0])
def test_loss_matches_naive_float64_reference(floor):
    gen, pos, neg, wg, wp, wn = _problem()
    temps = (0.02, 0.05, 0.2)
    loss, info = drift_loss(gen, pos, neg, weight_gen=wg, weight_pos=wp, weight_neg=wn,
                            temperatures=temps, affinity_floor=floor)
    goal, s_in, scale, lambdas = naive_goal(gen, pos, neg, wg.numpy(), wp.numpy(), wn.numpy(),
                                            temps, floor)
    expect = ((gen.numpy() / s_in - goal) ** 2).mean(axis=(1, 2))
    assert loss.dtype == torch.float32 and loss.shape == (2,)
    np.testing.assert_allclose(loss.numpy(), expect, rtol=1e-6, atol=1e-6)
    assert info["scale"].item() == pytest.approx(scale, rel=1e-6)
    for r, lam in zip(temps, lambdas):
        assert info[f"lambda/{r}"].item() == pytest.approx(lam, rel=1e-5)


def test_gradient_equals_analytic_form_and_stops_at_pos_neg():
    gen, pos, neg, wg, wp, wn = _problem(seed=1)
    gen = gen.float().requires_grad_(True)
    pos, neg = pos.float().requires_grad_(True), neg.float().requires_grad_(True)
    loss, _ = drift_loss(gen, pos, neg, weight_gen=wg, weight_pos=wp, weight_neg=wn)
    loss.sum().backward()
    goal, s_in, _, _ = naive_goal(gen.detach(), pos.detach(), neg.detach(), wg.numpy(),
                                  wp.numpy(), wn.numpy(), (0.02, 0.05, 0.2), 1e-6)
    _, c, s = gen.shape
    analytic = 2.0 / (c * s) * (gen.detach().double().numpy() / s_in - goal) / s_in
    np.testing.assert_allclose(gen.grad.numpy(), analytic, rtol=1e-4, atol=1e-6)
    assert pos.grad is None and neg.grad is None


def test_single_generated_sample_without_negatives_feels_no_force():
    gen = torch.tensor([[[0.3, -0.2]]])
    pos = torch.tensor([[[1.0, 1.0], [2.0, 0.5]]])
    loss, info = drift_loss(gen, pos)
    assert loss.item() == 0.0
    assert all(info[f"lambda/{r}"].item() == 0.0 for r in (0.02, 0.05, 0.2))


def test_zero_weight_column_equals_removing_it():
    gen, pos, neg, *_ = (t.float() for t in _problem(seed=2, cp=4, cn=3))
    wp = torch.ones(pos.shape[:2])
    wn = torch.ones(neg.shape[:2])
    wp[:, 1] = 0.0
    wn[:, 2] = 0.0
    keep_p, keep_n = [0, 2, 3], [0, 1]
    a, ia = drift_loss(gen, pos, neg, weight_pos=wp, weight_neg=wn)
    b, ib = drift_loss(gen, pos[:, keep_p], neg[:, keep_n])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ia["scale"], ib["scale"])


def test_computes_in_float32_for_half_inputs():
    gen, pos, neg, *_ = _problem(seed=3)
    ref, _ = drift_loss(gen.float(), pos.float(), neg.float())
    half, _ = drift_loss(gen.bfloat16(), pos.bfloat16(), neg.bfloat16())
    assert half.dtype == torch.float32
    bf = drift_loss(gen.bfloat16().float(), pos.bfloat16().float(), neg.bfloat16().float())[0]
    torch.testing.assert_close(half, bf)
    assert torch.allclose(half, ref, rtol=0.1)


def test_drift_pulls_generated_samples_towards_positives():
    gen = torch.zeros(1, 16, 2)
    gen[0, :, 0] = torch.linspace(-0.1, 0.1, 16)
    pos = torch.full((1, 16, 2), 3.0)
    gen.requires_grad_(True)
    loss, _ = drift_loss(gen, pos, affinity_floor=0.0)
    loss.sum().backward()
    # gradient descent moves every sample towards (3, 3)
    assert (gen.grad < 0).all()


def test_field_is_antisymmetric_and_zero_at_equilibrium():
    g = torch.Generator().manual_seed(4)
    x, p, q = (torch.randn(n, 3, generator=g) for n in (7, 5, 6))
    v = drift_field(x, p, q, 0.5)
    torch.testing.assert_close(drift_field(x, q, p, 0.5), -v)
    assert drift_field(x, p, p.clone(), 0.5).abs().max() < 1e-6
    assert v.abs().max() > 1e-2


def test_field_matches_kernel_formula_and_empty_negatives():
    g = torch.Generator().manual_seed(5)
    x, p = torch.randn(4, 2, generator=g).double(), torch.randn(6, 2, generator=g).double()
    k = torch.exp(-torch.cdist(x, p) / 0.3)
    mean_p = (k @ p) / k.sum(1, keepdim=True)
    torch.testing.assert_close(drift_field(x, p, None, 0.3), mean_p - x)
    torch.testing.assert_close(drift_field(x, p, p[:0], 0.3), mean_p - x)


def test_larger_temperature_gives_smoother_assignment():
    """V+ is a kernel-weighted mean; the weight on the nearer of two positives falls to 1/2."""
    x = torch.zeros(1, 1)
    pos = torch.tensor([[1.0], [3.0]])
    near_weight = []
    for tau in (0.1, 0.5, 2.0, 20.0):
        mean = drift_field(x, pos, None, tau)[0, 0].item()  # = w*1 + (1-w)*3
        near_weight.append((3.0 - mean) / 2.0)
    assert near_weight[0] > 0.99
    assert all(a > b for a, b in zip(near_weight, near_weight[1:]))
    assert near_weight[-1] == pytest.approx(0.5, abs=0.03)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gen=torch.zeros(2, 3), pos=torch.zeros(2, 1, 3)), r"gen.*\(2, 3\)"),
        (dict(gen=torch.zeros(2, 4, 3), pos=torch.zeros(2, 1, 5)), r"pos.*S = 3.*\(2, 1, 5\)"),
        (dict(gen=torch.zeros(2, 4, 3), pos=torch.zeros(3, 1, 3)), r"pos.*B = 2.*\(3, 1, 3\)"),
        (dict(gen=torch.zeros(2, 4, 3), pos=torch.zeros(2, 0, 3)), r"pos.*empty.*\(2, 0, 3\)"),
        (dict(gen=torch.zeros(2, 4, 3), pos=torch.zeros(2, 1, 3), neg=torch.zeros(2, 1, 2)),
         r"neg.*S = 3.*\(2, 1, 2\)"),
        (dict(gen=torch.full((2, 4, 3), float("nan")), pos=torch.zeros(2, 1, 3)), r"gen.*NaN"),
        (dict(gen=torch.zeros(2, 4, 3), pos=torch.zeros(2, 1, 3), weight_pos=torch.ones(2, 2)),
         r"weight_pos.*\(2, 1\).*\(2, 2\)"),
        (dict(gen=torch.zeros(2, 4, 3), pos=torch.zeros(2, 1, 3), temperatures=()), "temperatures"),
    ],
)
def test_bad_inputs_raise_naming_argument_and_shapes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        drift_loss(**kwargs)


class _NoHostReads(TorchDispatchMode):
    """Fails on any tensor -> Python scalar read (`if t.any()`, `.item()`): a host sync on a GPU."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("host read of a tensor value")
        return func(*args, **(kwargs or {}))


def test_validate_false_never_reads_values_on_the_host():
    g = torch.Generator().manual_seed(3)
    gen, pos, neg = (torch.randn(5, c, 4, generator=g) for c in (6, 2, 3))
    w_neg = torch.rand(5, 3, generator=g)
    checked, info = drift_loss(gen, pos, neg, weight_neg=w_neg)
    with _NoHostReads():
        fast, fast_info = drift_loss(gen, pos, neg, weight_neg=w_neg, validate=False)
    assert torch.equal(checked, fast) and all(torch.equal(info[k], fast_info[k]) for k in info)
    with pytest.raises(AssertionError, match="host read"), _NoHostReads():
        drift_loss(gen, pos, neg, weight_neg=w_neg)  # the value checks do read
    with pytest.raises(ValueError, match=r"pos.*B = 5"):  # shapes are still checked
        drift_loss(gen, pos[:2], validate=False)


def test_field_bad_inputs():
    with pytest.raises(ValueError, match=r"pos.*S = 2.*\(3, 3\)"):
        drift_field(torch.zeros(4, 2), torch.zeros(3, 3), None, 0.1)
    with pytest.raises(ValueError, match=r"pos.*empty"):
        drift_field(torch.zeros(4, 2), torch.zeros(0, 2), None, 0.1)
    with pytest.raises(ValueError, match=r"neg.*NaN"):
        drift_field(torch.zeros(4, 2), torch.zeros(3, 2), torch.full((2, 2), float("nan")), 0.1)


def _ddp_gradients(rank: int, world: int, init_file: str, out_file: str, reduce: bool) -> None:
    """One rank of the parity check: its slice of the problems, the shared statistics all-reduced
    when `reduce`, gradients averaged across ranks as DDP does; rank 0 saves them."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, noise, pos, neg = _parity_problem()
        per = noise.shape[0] // world
        rows = slice(rank * per, (rank + 1) * per)
        loss, info = drift_loss(model(noise[rows]), pos[rows], neg[rows], all_reduce=reduce)
        loss.mean().backward()
        grads = [p.grad for p in model.parameters()]
        for g in grads:
            dist.all_reduce(g)
            g /= world
        if rank == 0:
            torch.save({"grads": grads, "info": info}, out_file)
    finally:
        dist.destroy_process_group()


def _parity_problem():
    """A tiny linear generator and a batch of 4 problems (G = 5, S = 6)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 6)
    noise = torch.randn(4, 5, 3)
    pos = torch.randn(4, 7, 6) * torch.arange(1, 5).view(4, 1, 1)  # per-problem scales differ
    neg = torch.randn(4, 2, 6)
    return model, noise, pos, neg


def test_all_reduce_needs_a_process_group():
    gen, pos = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="all_reduce"):
        drift_loss(gen, pos, all_reduce=True)


def test_all_reduce_over_two_ranks_equals_one_process_on_the_whole_batch(tmp_path):
    """gloo, 2 processes, each with half the problems: the averaged gradients equal the
    single-process full-batch gradients; without the all-reduce they do not."""
    import torch.multiprocessing as mp

    model, noise, pos, neg = _parity_problem()
    loss, info = drift_loss(model(noise), pos, neg)
    loss.mean().backward()
    full = [p.grad for p in model.parameters()]
    got = {}
    for reduce in (True, False):
        out = tmp_path / f"grads_{reduce}.pt"
        mp.spawn(_ddp_gradients, args=(2, str(tmp_path / f"init_{reduce}"), str(out), reduce),
                 nprocs=2, join=True)
        got[reduce] = torch.load(out, weights_only=True)
    for g_ddp, g_full in zip(got[True]["grads"], full):
        torch.testing.assert_close(g_ddp, g_full, rtol=1e-5, atol=1e-6)
    for key, value in info.items():
        torch.testing.assert_close(got[True]["info"][key], value, rtol=1e-5, atol=0)
    assert not torch.allclose(got[False]["grads"][0], full[0], rtol=1e-3, atol=1e-5)
