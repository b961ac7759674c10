"""The drift core against an independent per-element float64 computation, and its properties."""

import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from drifting_policy.drift import drift_field, drift_loss


def _logsumexp(values):
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def naive_goal(gen, pos, neg, w_gen, w_pos, w_neg, temps, floor, exact=False):
    """drifting.md section 1 (the release's arithmetic) written out element by element in
    float64. exact=True: self-pairs get affinity 0 and weight-0 columns leave the row softmax.

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
                in_row = [j for j in range(t_n) if w[b, j] > 0 or not exact]
                lse_row = _logsumexp([logit[i, k] for k in in_row])
                for j in range(t_n):
                    if exact and (w[b, j] == 0 or j == i):  # removed column / self-pair
                        continue
                    lse_col = _logsumexp([logit[k, j] for k in range(cg)])
                    # row softmax * column softmax
                    p = math.exp(logit[i, j] - lse_row) * math.exp(logit[i, j] - lse_col)
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


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("floor", [1e-6, 0.0])
def test_loss_matches_naive_float64_reference(floor, exact):
    gen, pos, neg, wg, wp, wn = _problem()
    wn[1, 0] = 0.0  # a weight-0 column: kept in the release's row softmax, removed when exact
    temps = (0.02, 0.05, 0.2)
    loss, info = drift_loss(gen, pos, neg, weight_gen=wg, weight_pos=wp, weight_neg=wn,
                            temperatures=temps, affinity_floor=floor, exact_degenerate=exact)
    goal, s_in, scale, lambdas = naive_goal(gen, pos, neg, wg.numpy(), wp.numpy(), wn.numpy(),
                                            temps, floor, exact)
    expect = ((gen.numpy() / s_in - goal) ** 2).mean(axis=(1, 2))
    assert loss.dtype == torch.float64 and loss.shape == (2,)  # float64 stays float64
    np.testing.assert_allclose(loss.numpy(), expect, rtol=1e-9, atol=1e-12)
    assert info["scale"].item() == pytest.approx(scale, rel=1e-9)
    for r, lam in zip(temps, lambdas):
        assert info[f"lambda/{r}"].item() == pytest.approx(lam, rel=1e-9)


def _rel_err(a, b):
    """Relative error in norm; absolute when the reference is 0 (a force-free problem)."""
    err, ref = np.linalg.norm(np.asarray(a) - b), np.linalg.norm(b)
    return float(err / ref if ref > 0 else err)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize(
    "cg, cp, cn, s, weighted",
    [
        (1, 1, 0, 2, False),  # G = 1: the release's self column is the only "negative"
        (1, 3, 2, 4, True),
        (8, 1, 0, 2, False),  # the policy regime (PushT per timestep)
        (4, 1, 0, 7, False),
        (8, 1, 0, 2, True),
        (5, 3, 2, 3, True),
    ],
)
def test_float32_loss_and_gradient_match_reference_to_1e4(cg, cp, cn, s, weighted, exact):
    """The contract: default keywords equal the release to 1e-4 relative (loss and gradient)
    for any G >= 1, with and without negatives and weights; exact_degenerate likewise equals
    its own reference."""
    gen, pos, neg, wg, wp, wn = _problem(seed=cg * 10 + s, b=3, cg=cg, cp=cp, cn=cn, s=s)
    if weighted:
        wp[0, 0] = 0.0 if cp > 1 else wp[0, 0]
        wg[1, 0] = 0.0
    else:
        wg, wp, wn = torch.ones_like(wg), torch.ones_like(wp), torch.ones_like(wn)
    kw = dict(weight_gen=wg, weight_pos=wp, weight_neg=wn) if weighted else {}
    x = gen.float().requires_grad_(True)
    loss, _ = drift_loss(x, pos.float(), neg.float() if cn else None, exact_degenerate=exact,
                         **{k: v.float() for k, v in kw.items()})
    loss.sum().backward()
    goal, s_in, _, _ = naive_goal(gen, pos, neg, wg.numpy(), wp.numpy(), wn.numpy(),
                                  (0.02, 0.05, 0.2), 1e-6, exact)
    expect = ((gen.numpy() / s_in - goal) ** 2).mean(axis=(1, 2))
    grad = 2.0 / (cg * s) * (gen.numpy() / s_in - goal) / s_in
    assert loss.dtype == torch.float32
    assert _rel_err(loss.detach().numpy(), expect) < 1e-4
    assert _rel_err(x.grad.numpy(), grad) < 1e-4
    if cg == 1 and cn == 0:  # the floor's self column: the release pulls, the exact mode not
        assert (expect > 0.1).all() if not exact else (expect == 0).all()


def test_release_and_exact_modes_differ_in_the_policy_regime():
    """G = 8, one positive: the self-pair's floored affinity enters rowsum(A_neg) and so
    scales every attraction, which changes the gradient by about a percent."""
    gen, pos, *_ = _problem(seed=7, b=4, cg=8, cp=1, cn=0, s=2)
    grads = []
    for exact in (False, True):
        x = gen.clone().requires_grad_(True)
        drift_loss(x, pos, exact_degenerate=exact)[0].sum().backward()
        grads.append(x.grad.numpy())
    assert _rel_err(grads[1], grads[0]) > 1e-3


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


def test_single_generated_sample_without_negatives():
    """exact: force-free. Release: the floored self column is the only "negative", so the
    sample is pulled (with unit normalised force) towards the positives."""
    gen = torch.tensor([[[0.3, -0.2]]], requires_grad=True)
    pos = torch.tensor([[[1.0, 1.0], [2.0, 0.5]]])
    loss, info = drift_loss(gen, pos, exact_degenerate=True)
    assert loss.item() == 0.0
    assert all(info[f"lambda/{r}"].item() == 0.0 for r in (0.02, 0.05, 0.2))
    loss, info = drift_loss(gen, pos)
    loss.sum().backward()
    assert all(info[f"lambda/{r}"].item() > 0.0 for r in (0.02, 0.05, 0.2))
    towards_pos = pos[0].mean(0) - gen.detach()[0, 0]
    assert (-gen.grad[0, 0] @ towards_pos).item() > 0


def test_zero_weight_column_equals_removing_it_only_when_exact():
    gen, pos, neg, *_ = (t.float() for t in _problem(seed=2, cp=4, cn=3))
    wp = torch.ones(pos.shape[:2])
    wn = torch.ones(neg.shape[:2])
    wp[:, 1] = 0.0
    wn[:, 2] = 0.0
    keep_p, keep_n = [0, 2, 3], [0, 1]
    a, ia = drift_loss(gen, pos, neg, weight_pos=wp, weight_neg=wn, exact_degenerate=True)
    b, ib = drift_loss(gen, pos[:, keep_p], neg[:, keep_n], exact_degenerate=True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ia["scale"], ib["scale"])
    # the release keeps the weight-0 columns' share of the row softmax
    c, _ = drift_loss(gen, pos, neg, weight_pos=wp, weight_neg=wn)
    d, _ = drift_loss(gen, pos[:, keep_p], neg[:, keep_n])
    assert not torch.allclose(c, d, rtol=1e-3)


def test_computes_in_float32_for_half_inputs():
    gen, pos, neg, *_ = _problem(seed=3)
    ref, _ = drift_loss(gen.float(), pos.float(), neg.float())
    half, _ = drift_loss(gen.bfloat16(), pos.bfloat16(), neg.bfloat16())
    assert half.dtype == torch.float32
    bf = drift_loss(gen.bfloat16().float(), pos.bfloat16().float(), neg.bfloat16().float())[0]
    torch.testing.assert_close(half, bf)
    assert torch.allclose(half, ref, rtol=0.1)


def test_bf16_autocast_computes_the_float32_loss():
    """Under autocast the whole computation stays float32: the same bits as outside."""
    gen, pos, neg, *_ = (t.float() for t in _problem(seed=3, b=3, cg=8, cp=4, cn=2, s=6))
    ref, ref_info = drift_loss(gen, pos, neg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, auto_info = drift_loss(gen, pos, neg)
        assert (gen @ pos.transpose(1, 2)).dtype == torch.bfloat16  # autocast is active here
    assert auto.dtype == torch.float32
    assert torch.equal(auto, ref) and all(torch.equal(auto_info[k], ref_info[k]) for k in ref_info)


class _MatmulPrecision(TorchDispatchMode):
    """Records the CUDA float32 matmul precision setting seen by every matmul."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.bmm.default, torch.ops.aten.mm.default):
            self.seen.append(torch.backends.cuda.matmul.fp32_precision)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def tf32_enabled():
    """The caller allows TF32 matmuls (as training scripts often do); restored afterwards."""
    matmul = torch.backends.cuda.matmul
    saved, matmul.fp32_precision = matmul.fp32_precision, "tf32"
    yield
    matmul.fp32_precision = saved


def test_matmuls_run_without_tf32_and_the_setting_is_restored(tf32_enabled):
    gen, pos, *_ = (t.float() for t in _problem(seed=4))
    with _MatmulPrecision() as spy:
        drift_loss(gen, pos)
    assert spy.seen and set(spy.seen) == {"ieee"}
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"


def test_runs_on_the_meta_device_without_host_reads():
    """Every tensor it creates lives on the inputs' device (here: meta, where nothing exists)."""
    gen = torch.empty(6, 4, 3, device="meta", requires_grad=True)
    pos, neg = torch.empty(6, 2, 3, device="meta"), torch.empty(6, 1, 3, device="meta")
    valid = torch.empty(6, dtype=torch.bool, device="meta")
    loss, info = drift_loss(gen, pos, neg, weight_neg=torch.empty(6, 1, device="meta"),
                            groups=3, valid=valid, validate=False)
    assert loss.device.type == "meta" and loss.shape == (6,)
    assert all(v.device.type == "meta" and v.ndim == 0 for v in info.values())


def _blocks_by_separate_calls(gen, pos, neg, groups, **kw):
    """Loss [B] and info (means over blocks) from one drift_loss call per block."""
    rows = gen.shape[0] // groups
    out = [drift_loss(gen[i * rows:(i + 1) * rows], pos[i * rows:(i + 1) * rows],
                      neg[i * rows:(i + 1) * rows], **kw) for i in range(groups)]
    loss = torch.cat([o[0] for o in out])
    info = {k: torch.stack([o[1][k] for o in out]).mean() for k in out[0][1]}
    return loss, info


@pytest.mark.parametrize("exact", [False, True])
def test_groups_equal_separate_calls_per_block(exact):
    g = torch.Generator().manual_seed(11)
    # blocks at very different scales: shared statistics would differ from per-block ones
    scales = torch.tensor([1.0, 1.0, 10.0, 10.0, 0.1, 0.1])[:, None, None]
    gen = torch.randn(6, 5, 3, generator=g) * scales
    pos = gen[:, :2].detach() + 0.3 * torch.randn(6, 2, 3, generator=g)
    neg = torch.randn(6, 2, 3, generator=g)
    a = gen.clone().requires_grad_(True)
    b = gen.clone().requires_grad_(True)
    loss, info = drift_loss(a, pos, neg, groups=3, exact_degenerate=exact)
    ref, ref_info = _blocks_by_separate_calls(b, pos, neg, 3, exact_degenerate=exact)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    for k in ref_info:
        torch.testing.assert_close(info[k], ref_info[k], rtol=1e-5, atol=0)
    loss.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    shared, _ = drift_loss(gen, pos, neg, exact_degenerate=exact)
    assert not torch.allclose(shared, loss, rtol=1e-2)


def test_invalid_problems_are_excluded_as_if_absent():
    g = torch.Generator().manual_seed(12)
    gen = torch.randn(6, 4, 3, generator=g).requires_grad_(True)
    pos, neg = torch.randn(6, 1, 3, generator=g), torch.randn(6, 2, 3, generator=g)
    valid = torch.tensor([True, False, True, True, False, False])  # block 2 holds none
    wp = torch.ones(6, 1)
    wp[1] = 0.0  # an excluded problem needs no positive weight
    loss, info = drift_loss(gen, pos, neg, weight_pos=wp, groups=3, valid=valid)
    loss.sum().backward()
    keep = [0, 2]  # block 0 keeps row 0, block 1 keeps row 2 and 3
    r0, i0 = drift_loss(gen[:1], pos[:1], neg[:1])
    r1, i1 = drift_loss(gen[2:4], pos[2:4], neg[2:4])
    torch.testing.assert_close(loss[valid], torch.cat([r0, r1]))
    assert (loss[~valid] == 0).all() and (gen.grad[~valid] == 0).all()
    assert gen.grad[keep].abs().sum() > 0
    for k in i0:  # the mean over the blocks that hold a valid problem
        torch.testing.assert_close(info[k], (i0[k] + i1[k]) / 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(groups=4), r"groups.*B = 6.*got 4"),
        (dict(groups=0), r"groups.*got 0"),
        (dict(valid=torch.ones(6)), r"valid.*bool.*\(6,\)"),
        (dict(valid=torch.ones(5, dtype=torch.bool)), r"valid.*\(6,\).*\(5,\)"),
    ],
)
def test_bad_groups_and_valid_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        drift_loss(torch.zeros(6, 2, 3), torch.zeros(6, 1, 3), **kwargs)


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


def _ddp_gradients(
    rank: int, world: int, init_file: str, out_file: str, reduce: bool, groups: int
) -> None:
    """One rank of the parity check: its slice of the problems, the shared statistics all-reduced
    when `reduce`, gradients averaged across ranks as DDP does; rank 0 saves them."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, noise, pos, neg = _parity_problem()
        per = noise.shape[0] // world
        rows = slice(rank * per, (rank + 1) * per)
        loss, info = drift_loss(model(noise[rows]), pos[rows], neg[rows], all_reduce=reduce,
                                groups=groups)
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


@pytest.mark.parametrize("groups", [1, 2])
def test_all_reduce_over_two_ranks_equals_one_process_on_the_whole_batch(tmp_path, groups):
    """gloo, 2 processes, each with half the problems: the averaged gradients equal the
    single-process full-batch gradients; without the all-reduce they do not. With 2 blocks
    per rank, global block j is the union of the ranks' blocks j (rows j and 2 + j)."""
    import torch.multiprocessing as mp

    model, noise, pos, neg = _parity_problem()
    order = [0, 2, 1, 3] if groups == 2 else [0, 1, 2, 3]
    loss, info = drift_loss(model(noise[order]), pos[order], neg[order], groups=groups)
    loss.mean().backward()
    full = [p.grad for p in model.parameters()]
    got = {}
    for reduce in (True, False):
        out = tmp_path / f"grads_{reduce}.pt"
        mp.spawn(_ddp_gradients,
                 args=(2, str(tmp_path / f"init_{reduce}"), str(out), reduce, groups),
                 nprocs=2, join=True)
        got[reduce] = torch.load(out, weights_only=True)
    for g_ddp, g_full in zip(got[True]["grads"], full):
        torch.testing.assert_close(g_ddp, g_full, rtol=1e-5, atol=1e-6)
    for key, value in info.items():
        torch.testing.assert_close(got[True]["info"][key], value, rtol=1e-5, atol=0)
    assert not torch.allclose(got[False]["grads"][0], full[0], rtol=1e-3, atol=1e-5)
