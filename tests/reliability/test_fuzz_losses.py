"""Fuzzing every public loss at the edges of float32, bfloat16 and float64.

The contract checked here (alignlib/losses/_checks.py states it):

(a) bad input raises a ValueError that names the argument, and nothing else is raised;
    inputs must be finite with |x| <= 2^40 = 1.1e12 (MAX_MAGNITUDE);
(b) inside that domain every returned tensor and every gradient is free of NaN, and finite
    too, except where a loss type exponentiates its inputs (forward_kl and alpha_divergence
    scores, AlphaPO rewards) and the true score passes ~1e11 -- an oracle below computes
    the scores in float64 to tell which case a draw is in;
(c) gradients through losses.sum() obey the same rule;
(d) bf16 inputs are computed in float32 and come back float32, bit for bit what the same
    values give as float32; float64 stays float64.

Values are drawn from hand-picked edges (0, -0, subnormals, -88.7 where float32's exp
overflows, -1e4, -3e4, 1e12) and log-uniform magnitudes from 1e-45 to 1e12; now and then one
entry is replaced by an out-of-domain value (1e13, near float32's max, finfo.min) to check
the ValueError. beta spans [1e-6, 1e6], the documented range.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from alignlib.losses import (
    CPO_LOSS_TYPES,
    DPO_LOSS_TYPES,
    F_DIVERGENCES,
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    cpo_loss,
    dpo_loss,
    gae_advantages,
    kl_penalty,
    kl_shaped_rewards,
    masked_mean,
    orpo_loss,
    penalize_missing_eos,
    ppo_loss,
    ppo_policy_loss,
    ppo_value_loss,
    reward_ranking_loss,
    simpo_loss,
    whiten,
)

# alignlib.losses._checks.MAX_MAGNITUDE (1.1e12), restated here rather than read from the code.
DOMAIN = 2.0**40
# Exponential scores below this (a margin under the contract's 1e12) must give finite results.
FINITE_SCORES = 1e11
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float64])

# fmt: off
EDGES = [0.0, -0.0, -1e-45, -5e-324, -1e-38, -1e-12, -1e-7, -0.5, -1.0, -30.0, -88.7, -100.0, -710.0,
         -1e4, -3e4, -1e6, -1e9, -1e12]
# fmt: on
OUT_OF_DOMAIN = [-1.5e12, -1e13, -1e30, -3.0e38, torch.finfo(torch.float32).min, float("-inf"), float("nan")]
BETAS = st.one_of(st.sampled_from([1e-6, 1e-3, 0.1, 1.0, 1e4, 1e6]), st.floats(-6, 6).map(lambda e: 10.0**e))
SMOOTHING_EDGES = [0.0, 5e-324, 1e-3, 0.1, 0.25, 0.4999, math.nextafter(0.5, 0.0)]


# --- drawing inputs -------------------------------------------------------------------------


def nonpositive_values() -> st.SearchStrategy[float]:
    """Log-probs: edges, uniform over [-1e12, 0], log-uniform magnitudes 1e-45 .. 1e12."""
    return st.one_of(
        st.sampled_from(EDGES),
        st.floats(-DOMAIN, 0.0),
        st.floats(-45, 12).map(lambda e: -(10.0**e)),
    )


def signed_values() -> st.SearchStrategy[float]:
    """Rewards, values, advantages: the same magnitudes with either sign."""
    return st.one_of(nonpositive_values(), nonpositive_values().map(lambda v: -v))


def draw_vectors(
    data, count: int, n: int, dtype: torch.dtype, values=None, corrupt=True
) -> list[torch.Tensor]:
    """`count` tensors of shape (n,); with small probability one entry is out of the domain."""
    values = nonpositive_values() if values is None else values
    vectors = [data.draw(st.lists(values, min_size=n, max_size=n)) for _ in range(count)]
    if corrupt and data.draw(st.integers(0, 9)) == 0:
        which, where = data.draw(st.integers(0, count - 1)), data.draw(st.integers(0, n - 1))
        vectors[which][where] = data.draw(st.sampled_from(OUT_OF_DOMAIN))
    return [torch.tensor(v, dtype=torch.float64).to(dtype) for v in vectors]


def first_out_of_domain(named: dict[str, torch.Tensor]) -> str | None:
    """The first argument (in call order) holding a value the losses must reject, judged after the cast."""
    for name, value in named.items():
        if not bool((value.double().abs() <= DOMAIN).all()):
            return name
    return None


def compute_dtype(tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# --- the checks every call goes through -----------------------------------------------------


def check_call(
    fn, named: dict[str, torch.Tensor], kwargs: dict, finite: bool = True, extra_bad: str | None = None
):
    """Call fn(**named, **kwargs) and check (a)-(d). Returns the output, or None when it had to raise.

    named: the tensor arguments, in the order the function checks them.
    finite: whether the draw lies where every output must be finite (not just NaN-free).
    extra_bad: the name the ValueError must carry when the draw breaks a rule of its own (ORPO's <= 0).
    """
    bad = first_out_of_domain(named) or extra_bad
    leaves = {name: t.clone().requires_grad_(True) for name, t in named.items()}
    if bad is not None:
        with pytest.raises(ValueError, match=bad):
            fn(**leaves, **kwargs)
        return None
    out = fn(**leaves, **kwargs)
    tensors = {field: value for field, value in out._asdict().items() if isinstance(value, torch.Tensor)}
    expected_dtype = compute_dtype(named.values())
    for field, value in tensors.items():
        assert value.dtype == expected_dtype, f"{field} is {value.dtype}, expected {expected_dtype}"
        assert not bool(value.isnan().any()), f"{field} has NaN: {value}"
        if finite:
            assert bool(value.isfinite().all()), f"{field} is not finite: {value}"
    first = next(iter(tensors.values()))  # losses, or the PPO loss
    first.sum().backward()
    for name, leaf in leaves.items():
        if leaf.grad is None:
            continue
        assert leaf.grad.dtype == leaf.dtype
        assert not bool(leaf.grad.isnan().any()), f"d/{name} has NaN: {leaf.grad}"
        if finite:
            assert bool(leaf.grad.isfinite().all()), f"d/{name} is not finite: {leaf.grad}"
    if any(t.dtype == torch.bfloat16 for t in named.values()) and expected_dtype == torch.float32:
        # (d) bf16 is computed in float32: the same values given as float32 give the same bits.
        as_f32 = fn(**{name: t.float() for name, t in named.items()}, **kwargs)
        for field, value in tensors.items():
            torch.testing.assert_close(
                value, getattr(as_f32, field), rtol=0, atol=0, equal_nan=True, msg=field
            )
    return out


# --- DPO ------------------------------------------------------------------------------------

H_BASED = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop")
SMOOTHED = {"sigmoid", "robust", "aot", "aot_unpaired", "exo_pair"}


def exact_scores(u: torch.Tensor, f_div: str, alpha: float) -> torch.Tensor:
    """The f-divergence scores s(u) in float64 by the textbook formula, with none of the code's
    clamps: +-inf where they overflow float64 (the oracle for where results must be finite)."""
    u = u.double()
    if f_div == "forward_kl":
        return 1 - torch.exp(-u)
    if f_div == "alpha_divergence" and abs(alpha - 1) >= 1e-6:
        return torch.expm1((alpha - 1) * u) / (alpha - 1)
    return u


def exact_alphapo_rewards(logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """AlphaPO's r = (1 - P^-alpha) / alpha in float64, unclamped (log P itself for alpha = 0)."""
    logp = logp.double()
    return logp if alpha == 0 else -torch.expm1(-alpha * logp) / alpha


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
@given(data=st.data())
def test_dpo_loss(loss_type, data):
    dtype, n = data.draw(DTYPES), data.draw(st.integers(1, 6))
    names = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    named = dict(zip(names, draw_vectors(data, 4, n, dtype), strict=True))
    kwargs = {"loss_type": loss_type, "beta": data.draw(BETAS)}
    f_div, alpha = "reverse_kl", 0.5
    if loss_type in H_BASED:
        f_div = data.draw(st.sampled_from(F_DIVERGENCES))
        alpha = data.draw(
            st.one_of(
                st.sampled_from([0.0, 0.5, 1.5, 1 - 1e-7, 1 + 2e-6, 1 + 1e-4, -3.0, 3.0]), st.floats(-5, 5)
            )
        )
        kwargs.update(f_divergence_type=f_div, f_alpha_divergence_coef=alpha)
    if loss_type == "exo_pair":
        kwargs["label_smoothing"] = data.draw(st.sampled_from(SMOOTHING_EDGES[1:]))
    elif loss_type in SMOOTHED:
        kwargs["label_smoothing"] = data.draw(st.sampled_from(SMOOTHING_EDGES))
    if loss_type in ("ipo", "sigmoid_norm"):
        for name in ("chosen_lengths", "rejected_lengths"):
            kwargs[name] = torch.tensor(data.draw(st.lists(st.integers(0, 10**6), min_size=n, max_size=n)))
    if loss_type == "discopop":
        kwargs["discopop_tau"] = data.draw(
            st.one_of(st.sampled_from([0.05, 1.0, 2.0]), st.floats(-8, 3).map(lambda e: 10.0**e))
        )

    pi_w, pi_l, ref_w, ref_l = (t.double() for t in named.values())
    scores = exact_scores(torch.cat([pi_w - ref_w, pi_l - ref_l]), f_div, alpha)
    out = check_call(dpo_loss, named, kwargs, finite=bool((scores.abs() <= FINITE_SCORES).all()))
    if out is not None:
        assert out.losses.shape == (n,) and not out.chosen_rewards.requires_grad


CORNERS = [0.0, -1e-45, -1.0, -30.0, -100.0, -1e4, -1e10, -(2.0**40)]
EXPONENTIAL_ALPHAS = [0.5, 1.5, 1 + 2e-6, 1 - 2e-6, 1 + 1e-4, -3.0, 3.0]


def corner_grid(columns: int) -> torch.Tensor:
    """Every `columns`-tuple of CORNERS, one per row: (8 ** columns, columns) float64."""
    axes = torch.meshgrid(*[torch.tensor(CORNERS, dtype=torch.float64)] * columns, indexing="ij")
    return torch.stack([a.flatten() for a in axes], dim=1)


def check_grid_call(fn, grid: torch.Tensor, names, dtype, kwargs, finite_rows: torch.Tensor) -> None:
    """One vectorised call over the grid: no NaN anywhere, finite on the rows the oracle allows."""
    leaves = [grid[:, i].to(dtype).requires_grad_(True) for i in range(grid.shape[1])]
    out = fn(**dict(zip(names, leaves, strict=True)), **kwargs)
    out.losses.sum().backward()
    for field, value in out._asdict().items():
        assert not bool(value.isnan().any()), (field, kwargs, grid[value.isnan()][:3])
        assert bool(value[finite_rows].isfinite().all()), (
            field,
            kwargs,
            grid[finite_rows & ~value.isfinite()][:3],
        )
    for name, leaf in zip(names, leaves, strict=True):
        assert not bool(leaf.grad.isnan().any()), (name, kwargs, grid[leaf.grad.isnan()][:3])
        assert bool(leaf.grad[finite_rows].isfinite().all()), (name, kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)  # bf16 computes in float32 too
def test_dpo_corner_grid(dtype):
    """Every 4-tuple of corner log-probs in one batch, for every loss type, f-divergence and option edge.

    A deterministic complement to the random draws above: NaN at a corner needs several
    extremes at once (an alpha near 1, one log-ratio of +1e10, another of -1e10, no label
    smoothing), which forty random draws seldom line up.
    """
    grid = corner_grid(4)
    names = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    u = torch.cat([grid[:, 0:1] - grid[:, 2:3], grid[:, 1:2] - grid[:, 3:4]], dim=1)
    n = grid.shape[0]
    finite_rows = {}  # (f_div, alpha) -> rows whose scores the oracle keeps below FINITE_SCORES
    for f_div, alpha in [("reverse_kl", 1.0), ("js_divergence", 1.0), ("forward_kl", 1.0)] + [
        ("alpha_divergence", a) for a in EXPONENTIAL_ALPHAS
    ]:
        finite_rows[f_div, alpha] = exact_scores(u, f_div, alpha).abs().amax(dim=1) <= FINITE_SCORES
    for loss_type in DPO_LOSS_TYPES:
        variants = [("reverse_kl", 1.0)]
        if loss_type in H_BASED:
            variants += [("js_divergence", 1.0), ("forward_kl", 1.0)] + [
                ("alpha_divergence", a) for a in EXPONENTIAL_ALPHAS
            ]
        smoothing = [0.0, math.nextafter(0.5, 0.0)] if loss_type in SMOOTHED else [0.0]
        if loss_type == "exo_pair":
            smoothing = [5e-324, math.nextafter(0.5, 0.0)]
        for (f_div, alpha), beta, eps in itertools.product(variants, [1e-6, 1e6], smoothing):
            kwargs = {
                "loss_type": loss_type,
                "beta": beta,
                "label_smoothing": eps,
                "f_divergence_type": f_div,
                "f_alpha_divergence_coef": alpha,
            }
            if loss_type in ("ipo", "sigmoid_norm"):
                kwargs.update(chosen_lengths=torch.arange(n) % 7, rejected_lengths=torch.arange(n) % 5 + 1)
            if loss_type == "discopop":
                kwargs["discopop_tau"] = 2.0 if beta == 1e6 else 0.05
            check_grid_call(dpo_loss, grid, names, dtype, kwargs, finite_rows[f_div, alpha])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpo_corner_grid(dtype):
    """Every pair of corner log-probs, for every CPO loss type and AlphaPO's alpha at its edges."""
    grid = corner_grid(2)
    names = ("policy_chosen_logps", "policy_rejected_logps")
    for loss_type, alpha, beta in itertools.product(
        CPO_LOSS_TYPES, [0.0, 1e-20, 1e-6, 1e-5, 0.5, -0.5, 3.0, 1e6], [1e-6, 2.0, 1e6]
    ):
        for eps in [0.0, math.nextafter(0.5, 0.0)] if loss_type in ("sigmoid", "simpo") else [0.0]:
            kwargs = {"loss_type": loss_type, "beta": beta, "alpha": alpha, "label_smoothing": eps}
            finite = (exact_alphapo_rewards(grid, alpha).abs() <= FINITE_SCORES).all(dim=1)
            check_grid_call(cpo_loss, grid, names, dtype, kwargs, finite)


# --- CPO, SimPO, ORPO, reward ---------------------------------------------------------------

ALPHAS = st.one_of(
    st.just(0.0), st.sampled_from([1e-30, 1e-20, -1e-19, 1e-6, 0.25, -0.5, 3.0, -3.0]), st.floats(-5, 5)
)


def alphapo_rewards_small(named: dict[str, torch.Tensor], alpha: float) -> bool:
    """Whether AlphaPO's rewards stay below FINITE_SCORES by the float64 oracle (NaN counts as small)."""
    return not any(
        bool((exact_alphapo_rewards(t, alpha).abs() > FINITE_SCORES).any()) for t in named.values()
    )


@pytest.mark.parametrize("loss_type", CPO_LOSS_TYPES)
@given(data=st.data())
def test_cpo_loss(loss_type, data):
    dtype, n = data.draw(DTYPES), data.draw(st.integers(1, 6))
    named = dict(
        zip(("policy_chosen_logps", "policy_rejected_logps"), draw_vectors(data, 2, n, dtype), strict=True)
    )
    alpha = data.draw(ALPHAS)
    kwargs = {"loss_type": loss_type, "beta": data.draw(BETAS), "alpha": alpha}
    if loss_type in ("sigmoid", "simpo"):
        kwargs["label_smoothing"] = data.draw(st.sampled_from(SMOOTHING_EDGES))
    if loss_type == "simpo":
        kwargs["simpo_gamma"] = data.draw(st.sampled_from([0.0, 0.5, -1e4, 1e4, 1e6]))
    finite = first_out_of_domain(named) is not None or alphapo_rewards_small(named, alpha)
    check_call(cpo_loss, named, kwargs, finite=finite)


@given(data=st.data())
def test_simpo_loss(data):
    dtype, n = data.draw(DTYPES), data.draw(st.integers(1, 6))
    named = dict(
        zip(("policy_chosen_logps", "policy_rejected_logps"), draw_vectors(data, 2, n, dtype), strict=True)
    )
    alpha = data.draw(ALPHAS)
    kwargs = {
        "beta": data.draw(BETAS),
        "gamma": data.draw(st.floats(-1e6, 1e6)),
        "alpha": alpha,
        "label_smoothing": data.draw(st.sampled_from(SMOOTHING_EDGES)),
    }
    finite = first_out_of_domain(named) is not None or alphapo_rewards_small(named, alpha)
    check_call(simpo_loss, named, kwargs, finite=finite)


@given(data=st.data())
def test_orpo_loss(data):
    """ORPO's domain is [-1e12, 0] (average log-probs); log(1 - P) at P -> 1 is its hard edge."""
    dtype, n = data.draw(DTYPES), data.draw(st.integers(1, 6))
    near_zero = st.sampled_from([0.0, -0.0, -5e-324, -1e-45, -1e-30, -1e-13, -1e-12, -1e-9, -1e-7, -1e-3])
    values = st.one_of(nonpositive_values(), near_zero)
    tensors = draw_vectors(data, 2, n, dtype, values=values)
    if data.draw(st.integers(0, 3)) == 0:  # a log-prob above 0 is no log-prob (5e-324 is 0 in float32)
        tensors[data.draw(st.integers(0, 1))][0] = data.draw(
            st.sampled_from([5e-324, 1e-40, 1e-30, 1e-3, 1.0, 1e4])
        )
    named = dict(zip(("policy_chosen_logps", "policy_rejected_logps"), tensors, strict=True))
    positive = next((name for name, t in named.items() if bool((t > 0).any())), None)
    out = check_call(orpo_loss, named, {"beta": data.draw(BETAS)}, extra_bad=positive)
    if out is not None:
        assert bool((out.losses >= 0).all())  # -beta log sigmoid(.) >= 0


@given(data=st.data())
def test_reward_ranking_loss(data):
    dtype, n = data.draw(DTYPES), data.draw(st.integers(1, 6))
    named = dict(
        zip(
            ("chosen_rewards", "rejected_rewards"),
            draw_vectors(data, 2, n, dtype, values=signed_values()),
            strict=True,
        )
    )
    kind = data.draw(st.sampled_from(["none", "number", "tensor"]))
    margins = st.one_of(signed_values(), st.sampled_from(OUT_OF_DOMAIN[:3]))  # now and then beyond 2^40
    margin = None
    if kind == "number":
        margin = data.draw(margins)
    elif kind == "tensor":
        margin = torch.tensor(data.draw(st.lists(margins, min_size=n, max_size=n)), dtype=torch.float64)
    center = data.draw(st.one_of(st.none(), st.sampled_from([0.0, 0.01, 1.0, 1e6])))
    bad = first_out_of_domain(named)
    if (
        bad is None
        and margin is not None
        and not bool((torch.as_tensor(margin).double().abs() <= DOMAIN).all())
    ):
        bad = "margin"
    check_call(
        reward_ranking_loss, named, {"margin": margin, "center_rewards_coefficient": center}, extra_bad=bad
    )


# --- options outside their range --------------------------------------------------------------

ANY_FLOAT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 0.5, 1.0, 1e300])
)


def usually(*typical: float) -> st.SearchStrategy[float]:
    """Mostly typical valid values, sometimes any float at all: so one extreme option meets valid others."""
    return st.one_of(st.sampled_from(typical), st.sampled_from(typical), ANY_FLOAT)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
@given(
    f_div=st.sampled_from(F_DIVERGENCES),
    beta=usually(0.1, 1e6),
    eps=usually(0.0),
    tau=usually(0.05),
    alpha=usually(0.5),
)
# Found by CI: a subnormal beta and tau are 0 in float32, and discopop's x / tau was 0 / 0.
@example(f_div="reverse_kl", beta=2.2250738585e-313, eps=0.0, tau=2.2250738585e-313, alpha=0.5)
def test_any_dpo_option_either_works_or_names_itself(loss_type, f_div, beta, eps, tau, alpha):
    """Whatever floats the options get: a ValueError naming one of them, or a NaN-free result."""
    f_div = f_div if loss_type in H_BASED else "reverse_kl"
    logps = [
        torch.tensor([-3.0, -40.0]),
        torch.tensor([-5.0, 0.0]),
        torch.tensor([-4.0, -30.0]),
        torch.tensor([-4.0, -2.0]),
    ]
    kwargs = {
        "beta": beta,
        "loss_type": loss_type,
        "label_smoothing": eps,
        "discopop_tau": tau,
        "f_divergence_type": f_div,
        "f_alpha_divergence_coef": alpha,
        "chosen_lengths": torch.tensor([3, 0]),
        "rejected_lengths": torch.tensor([1, 9]),
    }
    try:
        out = dpo_loss(*logps, **kwargs)
    except ValueError as error:
        words = ("beta", "label_smoothing", "discopop_tau", "f_divergence_type", "f_alpha_divergence_coef")
        assert any(word in str(error) for word in words), error
        return
    assert not any(bool(t.isnan().any()) for t in out)


@given(
    loss_type=st.sampled_from(CPO_LOSS_TYPES),
    beta=usually(2.0),
    eps=usually(0.0),
    gamma=usually(0.5),
    alpha=usually(0.0, 0.25),
)
def test_any_cpo_option_either_works_or_names_itself(loss_type, beta, eps, gamma, alpha):
    kwargs = {
        "beta": beta,
        "loss_type": loss_type,
        "label_smoothing": eps,
        "simpo_gamma": gamma,
        "alpha": alpha,
    }
    try:
        out = cpo_loss(torch.tensor([-3.0, -0.1, 0.0]), torch.tensor([-5.0, -1e-9, -1e10]), **kwargs)
    except ValueError as error:
        assert any(word in str(error) for word in ("beta", "label_smoothing", "gamma", "alpha")), error
        return
    assert not any(bool(t.isnan().any()) for t in out)


OVER = 1e6 * (1 + 1e-9)  # just above MAX_COEFFICIENT


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda x: dpo_loss(x, x, x, x, beta=OVER), "beta"),
        (
            lambda x: dpo_loss(
                x, x, x, x, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=-OVER
            ),
            "f_alpha_divergence_coef",
        ),
        (lambda x: cpo_loss(x, x, beta=OVER), "beta"),
        (lambda x: cpo_loss(x, x, alpha=OVER), "alpha"),
        (lambda x: simpo_loss(x, x, gamma=-OVER), "gamma"),
        (lambda x: orpo_loss(x, x, beta=OVER), "beta"),
        (lambda x: reward_ranking_loss(x, x, center_rewards_coefficient=OVER), "center_rewards_coefficient"),
        (lambda x: reward_ranking_loss(x, x, margin=2.0**40 * 1.5), "margin"),
        (
            lambda x: kl_shaped_rewards(
                x[:1], x[None], x[None], torch.ones(1, 2, dtype=torch.bool), kl_coef=OVER
            ),
            "kl_coef",
        ),
        (lambda x: ppo_loss(*[x[None]] * 6, torch.ones(1, 2, dtype=torch.bool), vf_coef=OVER), "vf_coef"),
        (lambda x: AdaptiveKLController(OVER, 6.0, 1e4), "init_kl_coef"),
        (lambda x: FixedKLController(OVER), "kl_coef"),
        (lambda x: AdaptiveKLController(0.2, 6.0, 10.0).update(0.0, 50), "n_steps"),
        (lambda x: whiten(torch.ones(1, 3), eps=0.0), "eps"),
    ],
)
def test_options_just_beyond_their_range_are_refused_by_name(call, name):
    """The documented edges, checked at the edge: each bound exists and names its argument."""
    with pytest.raises(ValueError, match=name):
        call(torch.tensor([-1.0, -2.0]))


# --- PPO --------------------------------------------------------------------------------------

GARBAGE = [float("nan"), float("inf"), float("-inf"), 3e38, -1e30]


def draw_rollout(data, count: int, dtype, values_for=None):
    """(B, T) tensors, a mask with >= 1 response token per row, and garbage on the padding."""
    rows, cols = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 5))
    flat = draw_vectors(data, count, rows * cols, dtype, values=values_for, corrupt=False)
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols))).view(
        rows, cols
    )
    mask[
        torch.arange(rows),
        torch.tensor(data.draw(st.lists(st.integers(0, cols - 1), min_size=rows, max_size=rows))),
    ] = True
    filler = data.draw(st.sampled_from(GARBAGE))
    tensors = [
        torch.where(mask, t.view(rows, cols), torch.tensor(filler, dtype=torch.float64).to(dtype))
        for t in flat
    ]
    if data.draw(st.integers(0, 9)) == 0:  # one response token out of the domain
        row, col = mask.nonzero()[data.draw(st.integers(0, int(mask.sum()) - 1))]
        tensors[data.draw(st.integers(0, count - 1))][row, col] = data.draw(st.sampled_from(OUT_OF_DOMAIN))
    return tensors, mask


def rollout_out_of_domain(named: dict[str, torch.Tensor], mask: torch.Tensor) -> str | None:
    for name, value in named.items():
        if not bool((value.double()[mask].abs() <= DOMAIN).all()):
            return name
    return None


def check_rollout_call(fn, named, mask, kwargs=None, positional_mask=True):
    """Like check_call, for (B, T) tensors whose padding holds garbage: only the mask counts."""
    kwargs = kwargs or {}
    bad = rollout_out_of_domain(named, mask)
    leaves = {name: t.clone().requires_grad_(True) for name, t in named.items()}
    if bad is not None:
        with pytest.raises(ValueError, match=bad):
            fn(**leaves, mask=mask, **kwargs)
        return None
    out = fn(**leaves, mask=mask, **kwargs)
    fields = out._asdict() if hasattr(out, "_asdict") else {"result": out}
    tensors = {k: v for k, v in fields.items() if isinstance(v, torch.Tensor)}
    expected_dtype = compute_dtype(named.values())
    for field, value in tensors.items():
        assert value.dtype == expected_dtype, f"{field} is {value.dtype}, expected {expected_dtype}"
        assert bool(value.isfinite().all()), f"{field} is not finite: {value}"
        if value.shape == mask.shape:
            assert bool((value[~mask] == 0).all()), f"{field}: padding must be 0"
    next(iter(tensors.values())).sum().backward()
    for name, leaf in leaves.items():
        if leaf.grad is not None:
            assert bool(leaf.grad[mask].isfinite().all()), f"d/{name} is not finite: {leaf.grad}"
            assert bool((leaf.grad[~mask] == 0).all()), f"d/{name} leaks into padding"
    return out


@given(data=st.data(), estimator=st.sampled_from(KL_ESTIMATORS))
def test_kl_penalty(data, estimator):
    dtype = data.draw(DTYPES)
    logprobs, ref = draw_vectors(data, 2, data.draw(st.integers(1, 8)), dtype, corrupt=False)
    kl = kl_penalty(logprobs, ref, estimator)
    assert kl.dtype == compute_dtype([logprobs]) and bool(kl.isfinite().all()), kl
    if estimator != "k1":
        assert bool((kl >= 0).all()), kl  # k2, k3, abs, mse are non-negative estimates


@given(data=st.data(), estimator=st.sampled_from(KL_ESTIMATORS))
def test_kl_shaped_rewards(data, estimator):
    dtype = data.draw(DTYPES)
    (logprobs, ref), mask = draw_rollout(data, 2, dtype)
    scores = torch.tensor(
        data.draw(st.lists(signed_values(), min_size=mask.shape[0], max_size=mask.shape[0]))
    ).to(dtype)
    kl_coef = data.draw(st.sampled_from([0.0, 1e-3, 0.2, 1e3, 1e6]))
    named = {"logprobs": logprobs, "ref_logprobs": ref}
    bad = rollout_out_of_domain(named, mask) or (
        None if bool((scores.double().abs() <= DOMAIN).all()) else "scores"
    )
    if bad is not None:
        with pytest.raises(ValueError, match=bad):
            kl_shaped_rewards(scores, logprobs, ref, mask, kl_coef=kl_coef, estimator=estimator)
        return
    out = kl_shaped_rewards(scores, logprobs, ref, mask, kl_coef=kl_coef, estimator=estimator)
    for field, value in out._asdict().items():
        assert value.dtype == compute_dtype([logprobs]) and bool(value.isfinite().all()), (field, value)
        assert bool((value[~mask] == 0).all()), field


@given(data=st.data())
def test_gae_advantages_and_whiten(data):
    dtype = data.draw(DTYPES)
    (rewards, values), mask = draw_rollout(data, 2, dtype, values_for=signed_values())
    gamma, lam = data.draw(st.sampled_from([0.0, 0.5, 1.0])), data.draw(st.sampled_from([0.0, 0.95, 1.0]))
    out = check_rollout_call(
        gae_advantages, {"rewards": rewards, "values": values}, mask, {"gamma": gamma, "lam": lam}
    )
    if out is None or int(mask.sum()) < 2:
        return
    advantages = out.advantages.detach()
    if rollout_out_of_domain({"x": advantages}, mask):  # A can reach 3 * 2^40, beyond whiten's domain
        with pytest.raises(ValueError, match="x has values of magnitude"):
            whiten(advantages, mask)
        return
    for shift_mean in (True, False):
        white = whiten(advantages, mask, shift_mean=shift_mean)
        assert bool(white.isfinite().all()) and bool((white[~mask] == 0).all()), white


@given(data=st.data())
def test_ppo_policy_value_and_total_loss(data):
    dtype = data.draw(DTYPES)
    (logprobs, old_logprobs), mask = draw_rollout(data, 2, dtype)
    (advantages, values, old_values, returns), _ = draw_rollout_like(data, 4, dtype, mask)
    cliprange = data.draw(st.sampled_from([1e-6, 0.2, 1.0, 1e6]))
    check_rollout_call(
        ppo_policy_loss,
        {"logprobs": logprobs, "old_logprobs": old_logprobs, "advantages": advantages},
        mask,
        {"cliprange": cliprange},
    )
    check_rollout_call(
        ppo_value_loss,
        {"values": values, "old_values": old_values, "returns": returns},
        mask,
        {"cliprange_value": cliprange},
    )
    coefs = {
        "vf_coef": data.draw(st.sampled_from([0.0, 0.1, 1e6])),
        "entropy_coef": 0.0,
        "cliprange": cliprange,
    }
    check_rollout_call(
        ppo_loss,
        {
            "logprobs": logprobs,
            "old_logprobs": old_logprobs,
            "advantages": advantages,
            "values": values,
            "old_values": old_values,
            "returns": returns,
        },
        mask,
        coefs,
    )


def draw_rollout_like(data, count, dtype, mask):
    """`count` signed (B, T) tensors on an existing mask, garbage on its padding."""
    flat = draw_vectors(data, count, mask.numel(), dtype, values=signed_values(), corrupt=False)
    filler = torch.tensor(data.draw(st.sampled_from(GARBAGE)), dtype=torch.float64).to(dtype)
    return [torch.where(mask, t.view(mask.shape), filler) for t in flat], mask


@given(data=st.data())
def test_masked_mean_and_missing_eos(data):
    dtype = data.draw(DTYPES)
    (x,), mask = draw_rollout(data, 1, dtype, values_for=signed_values())
    if rollout_out_of_domain({"x": x}, mask) is None:
        assert bool(masked_mean(x.float(), mask).isfinite())
    assert float(masked_mean(x, torch.zeros_like(mask))) == 0.0  # no entries: 0, not 0/0
    scores = torch.tensor(data.draw(st.lists(signed_values(), min_size=1, max_size=4)), dtype=torch.float64)
    contains_eos = torch.tensor(
        data.draw(st.lists(st.booleans(), min_size=len(scores), max_size=len(scores)))
    )
    penalty = data.draw(st.sampled_from([None, 0.0, 1.0, 1e6, -1.0, float("nan")]))
    if penalty is not None and not (penalty >= 0):
        with pytest.raises(ValueError, match="missing_eos_penalty"):
            penalize_missing_eos(scores, contains_eos, penalty)
        return
    out = penalize_missing_eos(scores, contains_eos, penalty)
    assert bool(out.isfinite().all()) and bool((out <= scores).all())


@given(
    init=usually(0.2, 1e6),
    target=usually(6.0),
    horizon=usually(1.0, 1e4),
    kl=usually(0.0, 3.0, 60.0),
    n_steps=st.one_of(
        st.integers(-2, 12), st.integers(-5, 10**5), st.sampled_from([True, 0.5, float("nan")])
    ),
)
def test_kl_controllers(init, target, horizon, kl, n_steps):
    """The coefficient stays finite and >= 0 under any update that is not refused with a named ValueError."""
    try:
        controller = AdaptiveKLController(init, target, horizon)
    except ValueError as error:
        assert any(word in str(error) for word in ("init_kl_coef", "target", "horizon")), error
        return
    try:
        controller.update(kl, n_steps)
    except ValueError as error:
        assert "current_kl" in str(error) or "n_steps" in str(error), error
        return
    assert math.isfinite(controller.value) and controller.value >= 0, controller.value
    try:
        fixed = FixedKLController(init)
    except ValueError as error:
        assert "kl_coef" in str(error)
        return
    fixed.update(kl, n_steps)
    assert fixed.value == float(init)
