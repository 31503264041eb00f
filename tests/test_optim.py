"""dwp.optim: the natural-gradient scale step reaches the exact mean-field posterior of
Bayesian linear regression and a reference for logistic regression; scales that the data
constrain shrink and the others grow to the prior; IVON's update as the paper writes it;
the factory's errors; resume."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import dwp
from dwp.optim import IVON, NaturalVI, build_optimizer, sampling_step, to_bayesian


def _regression(n=40, seed=0, correlated=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    if correlated:
        x = x @ torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.5, 0.0], [0.0, 0.0, 0.15]]).double()
    else:  # orthogonal columns: the exact posterior is factorised, mean field is exact
        x = torch.linalg.qr(x).Q * torch.tensor([6.0, 2.0, 0.5]).double()
    y = x @ torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64)
    return x, y + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)


def _log_rms(trace):
    """log sqrt(mean sigma^2) of a trace of log-sigmas: the natural step's fixed point is
    E[sigma^2] = sigma*^2 (it is linear in the precision), so this, not the mean of log
    sigma (lower by its variance), is what estimates log sigma*."""
    return 0.5 * (2 * torch.stack(trace)).exp().mean(0).log()


def _standard_error(trace, batches=20):
    """Standard error of :func:`_log_rms` by batch means: consecutive steps are correlated
    (over about 1 / rate steps), so the trace is cut into ``batches`` long batches."""
    values = torch.stack(trace)
    means = torch.stack([_log_rms(list(chunk)) for chunk in values.chunk(batches)])
    return means.std(0) / math.sqrt(batches)


def _fit_linear_regression(x, y, beta, estimator="reparam", steps=4000, burn_in=1000):
    """NaturalVI on ``data + beta * KL`` (prior N(0, 1), noise 0.5): rate 0.2 for the way
    there, then 0.05; returns the trace of log-sigmas after ``burn_in`` steps."""
    layer = dwp.BayesLinear(3, 1, bias=False, dtype=torch.float64, estimator=estimator)
    optimizer = NaturalVI(layer, lr=0.05, kl_weight=beta, scale_rate=0.2)
    trace = []
    for step in range(steps):
        if step == 500:
            optimizer.param_groups[-1]["lr"] = 0.05
        nll = dwp.likelihoods.gaussian_nll(layer(x)[:, 0], y, 0.5)
        loss = dwp.elbo(nll, layer, n_data=len(x), batch_size=len(x), beta=beta).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= burn_in:
            trace.append(layer.weight_log_sigma.detach()[0].clone())
    return trace


@pytest.mark.parametrize("beta", [1.0, 0.05])
@pytest.mark.parametrize("correlated", [False, True], ids=["orthogonal", "correlated"])
def test_natural_scales_reach_the_mean_field_posterior_of_linear_regression(correlated, beta):
    """The mean-field optimum of ``data + beta * KL(q || N(0, 1))`` for a Gaussian
    likelihood with noise tau has the closed form sigma_i^2 = 1 / (A_ii / beta + 1),
    A = X^T X / tau^2 (in the correlated design the exact posterior is not factorised, and
    this is the best factorised one).  The step is stochastic; its average over 3,000
    steps must be within 5 standard errors (batch means) of the closed form."""
    torch.manual_seed(0)
    x, y = _regression(correlated=correlated)
    sigma = (1.0 / ((x.T @ x).diagonal() / 0.5**2 / beta + 1.0)).sqrt()
    trace = _fit_linear_regression(x, y, beta)
    error = _log_rms(trace) - sigma.log()
    tolerance = 5 * _standard_error(trace)
    assert (error.abs() < tolerance).all(), (error, tolerance)
    assert (tolerance < 0.1).all()  # the test can tell a 10 % error in sigma


def _logistic_data(n=60, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64) * torch.tensor([1.5, 0.3]).double()
    p = torch.sigmoid(x @ torch.tensor([2.0, -1.0]).double())
    return x, torch.bernoulli(p, generator=g)


def _reference_logistic_mean_field(x, y, beta):
    """The mean-field optimum of ``E_q[NLL] + beta * KL(q || N(0, 1))``, computed without
    sampling: E_q[log sigmoid] of the Gaussian pre-activation by Gauss-Hermite quadrature
    (40 nodes, exact to double precision here), minimised with L-BFGS."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(40)
    nodes = torch.tensor(nodes, dtype=torch.float64)
    weights = torch.tensor(weights / weights.sum(), dtype=torch.float64)
    mu = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    log_sigma = torch.full((2,), -1.0, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS(
        [mu, log_sigma],
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def objective():
        optimiser.zero_grad()
        sigma = log_sigma.exp()
        mean, std = x @ mu, ((x**2) @ sigma**2).sqrt()
        a = mean[:, None] + std[:, None] * nodes[None]
        logits = torch.where(y[:, None] > 0, a, -a)
        nll = -(torch.nn.functional.logsigmoid(logits) * weights).sum()
        kl = (0.5 * (sigma**2 + mu**2) - log_sigma - 0.5).sum()
        loss = nll + beta * kl
        loss.backward()
        return loss

    optimiser.step(objective)
    return log_sigma.detach()


def test_natural_scales_reach_a_reference_on_logistic_regression():
    """No closed form: the reference is the deterministic optimum of the same ELBO, with
    the expectations by Gauss-Hermite quadrature.  Tolerance as for linear regression."""
    torch.manual_seed(0)
    x, y = _logistic_data()
    beta = 1.0
    reference = _reference_logistic_mean_field(x, y, beta)
    layer = dwp.BayesLinear(2, 1, bias=False, dtype=torch.float64, estimator="local_reparam")
    optimizer = NaturalVI(layer, lr=0.05, kl_weight=beta, scale_rate=0.2)
    trace = []
    for step in range(3000):
        if step == 500:
            optimizer.param_groups[-1]["lr"] = 0.05
        nll = dwp.likelihoods.bernoulli_nll(layer(x)[:, 0], y)
        loss = dwp.elbo(nll, layer, n_data=len(x), batch_size=len(x), beta=beta).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= 1000:
            trace.append(layer.weight_log_sigma.detach()[0].clone())
    error = _log_rms(trace) - reference
    tolerance = 5 * _standard_error(trace)
    assert (error.abs() < tolerance).all(), (error, tolerance, reference)
    assert (tolerance < 0.1).all()


def test_scales_learn_what_the_data_constrain():
    """A conv whose second input channel is always zero (it only ever sees padding): the
    kernels on the first channel shrink below their initial scale, those on the zero
    channel grow to the prior's scale (no data, so the posterior is the prior), within
    300 steps; under Adam at a tenth of the learning rate neither moves by 0.1."""
    torch.manual_seed(0)
    x = torch.randn(16, 2, 12, 12)
    x[:, 1] = 0.0
    y = torch.nn.functional.conv2d(x[:, :1], torch.randn(1, 1, 3, 3), padding=1)

    def train(optimizer_name):
        torch.manual_seed(1)
        net = dwp.BayesConv2d(2, 1, 3, padding=1, prior=dwp.NormalPrior(0.0, 0.5))
        start = net.weight_log_sigma.detach().clone()
        optimizer = build_optimizer(optimizer_name, net, 1e-2, kl_weight=1.0, scale_lr=1e-3)
        for _ in range(300):
            nll = dwp.likelihoods.gaussian_nll(net(x), y, 0.1)
            loss = dwp.elbo(nll, net, n_data=16, batch_size=16, beta=1.0).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return start, net.weight_log_sigma.detach()

    start, natural = train("natural")
    seen, unseen = natural[0, 0], natural[0, 1]
    assert (seen < start[0, 0] - 1.0).all()  # the data pin these down
    torch.testing.assert_close(unseen.exp(), torch.full_like(unseen, 0.5), rtol=0.05, atol=0)
    start, adam = train("adam")
    assert (adam - start).abs().max() < 0.5
    assert (natural - start).abs().min() > 1.0


def test_the_natural_step_in_closed_form():
    layer = dwp.BayesLinear(2, 1, bias=False, init_log_sigma=-2.0)
    optimizer = NaturalVI(layer, lr=0.0, kl_weight=0.5, scale_rate=0.3)
    gradient = torch.tensor([[0.2, -3.0]])
    layer.weight_log_sigma.grad = gradient.clone()
    layer.weight.grad = torch.zeros_like(layer.weight)
    optimizer.step()
    x = 0.3 * gradient / 0.5
    expected = -2.0 - 0.5 * torch.log(1 + x + x**2 / 2)
    torch.testing.assert_close(layer.weight_log_sigma.detach(), expected)
    # a weight of 0 (a warm-up from 0) leaves the scales; the override wins for one step
    layer.weight_log_sigma.grad = gradient.clone()
    optimizer.step(kl_weight=0.0)
    torch.testing.assert_close(layer.weight_log_sigma.detach(), expected)
    assert optimizer.param_groups[-1]["steps"] == 2


def test_means_train_exactly_as_under_torch_adam():
    torch.manual_seed(0)
    net = nn.Sequential(dwp.BayesLinear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    twin = [p.detach().clone().requires_grad_() for p in net.parameters()]
    means = [p for n, p in net.named_parameters() if not n.endswith("_log_sigma")]
    twin_means = [
        t
        for (n, _), t in zip(net.named_parameters(), twin, strict=True)
        if not n.endswith("_log_sigma")
    ]
    natural = NaturalVI(net, lr=0.01, kl_weight=1.0, weight_decay=1e-3)
    adam = torch.optim.Adam(twin_means, lr=0.01, weight_decay=1e-3)
    for _ in range(5):
        gradients = [torch.randn_like(p) for p in net.parameters()]
        for p, t, g in zip(net.parameters(), twin, gradients, strict=True):
            p.grad, t.grad = g.clone(), g.clone()
        natural.step()
        adam.step()
    for p, t in zip(means, twin_means, strict=True):
        assert torch.equal(p, t)


def test_schedule_and_state_survive_a_resume():
    schedule = dwp.KLSchedule("linear", start=0.1, end=1.0, steps=10)
    seen = []

    def weight(step):
        seen.append(step)
        return schedule(step)

    def make():
        torch.manual_seed(0)
        return dwp.BayesLinear(2, 2)

    def run(layer, optimizer, steps):
        for _ in range(steps):
            layer.weight.grad = torch.ones_like(layer.weight)
            layer.bias.grad = torch.ones_like(layer.bias)
            layer.weight_log_sigma.grad = torch.full_like(layer.weight, 0.3)
            optimizer.step()

    full = make()
    run(full, NaturalVI(full, kl_weight=weight), 6)
    cut = make()
    first = NaturalVI(cut, kl_weight=weight)
    run(cut, first, 3)
    state = first.state_dict()
    resumed = NaturalVI(cut, kl_weight=weight)
    resumed.load_state_dict(state)
    run(cut, resumed, 3)
    assert seen == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]
    for a, b in zip(full.parameters(), cut.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "prior",
    [
        lambda: dwp.NormalPrior(),
        lambda: dwp.PretrainedNormalPrior(),
        lambda: dwp.LogUniformPrior(),
        lambda: dwp.DeepWeightPrior({"all": dwp.KernelVAE((3, 3))}),
    ],
    ids=["normal", "pretrained", "log_uniform", "deep"],
)
def test_every_prior_trains_under_natural_scales(prior):
    torch.manual_seed(0)
    net = dwp.bayesianize(
        nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 1, 3)),
        prior(),
        include=[nn.Conv2d],
    )
    x = torch.randn(8, 1, 10, 10)
    y = torch.randn(8, 1, 6, 6)
    start = torch.cat(
        [p.detach().flatten() for p in NaturalVI(net, kl_weight=1e-2).scale_parameters()]
    )
    optimizer = build_optimizer("natural", net, 1e-2, kl_weight=1e-2)
    for _ in range(20):
        nll = dwp.likelihoods.gaussian_nll(net(x), y)
        loss = dwp.elbo(nll, net, n_data=8, batch_size=8, beta=1e-2).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    scales = torch.cat([p.detach().flatten() for p in optimizer.scale_parameters()])
    assert torch.isfinite(scales).all() and (scales - start).abs().mean() > 0.05


def test_the_factory_names_the_option_that_does_not_fit():
    plain = nn.Linear(2, 2)
    bayesian = dwp.bayesianize(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"'natural' updates posterior scales.*no trainable"):
        build_optimizer("natural", plain, 1e-3, kl_weight=1.0)
    with pytest.raises(ValueError, match="'natural' needs kl_weight"):
        build_optimizer("natural", bayesian, 1e-3)
    with pytest.raises(ValueError, match=r"'ivon' keeps its own posterior.*Bayesian layers"):
        build_optimizer("ivon", bayesian, 0.1, ess=10)
    with pytest.raises(ValueError, match="'ivon' needs ess"):
        build_optimizer("ivon", plain, 0.1)
    with pytest.raises(ValueError, match=r"unknown optimizer 'adamax'.*natural"):
        build_optimizer("adamax", plain, 1e-3)
    with pytest.raises(ValueError, match="KL weight, a finite number >= 0"):
        NaturalVI(bayesian, kl_weight=-1.0)
    with pytest.raises(ValueError, match="scale_rate"):
        NaturalVI(bayesian, kl_weight=1.0, scale_rate=2.0)
    assert isinstance(build_optimizer("adam", bayesian, 1e-3), torch.optim.Adam)
    assert isinstance(build_optimizer("sgd", plain, 1e-3), torch.optim.SGD)


# -- IVON ------------------------------------------------------------------------------------
def test_ivon_step_is_the_papers_update():
    """One step of Algorithm 1 (Shen et al. 2024) with hand-set noise and gradient."""
    p = nn.Parameter(torch.tensor([0.5, -1.0]))
    optimizer = IVON([p], lr=0.1, ess=10.0, hess_init=0.2, beta1=0.9, beta2=0.8, weight_decay=0.01)
    sigma = (10.0 * (torch.tensor([0.2, 0.2]) + 0.01)).rsqrt()
    with optimizer.sampled_params(train=True):
        theta = p.detach().clone()
        p.grad = torch.tensor([0.3, -0.2])
    noise = theta - torch.tensor([0.5, -1.0])
    torch.testing.assert_close(noise.abs() > 0, torch.tensor([True, True]))
    optimizer.step()
    g, h = torch.tensor([0.3, -0.2]), torch.tensor([0.2, 0.2])
    h_hat = g * noise / sigma**2
    h_new = 0.8 * h + 0.2 * h_hat + 0.5 * 0.2**2 * (h - h_hat) ** 2 / (h + 0.01)
    momentum = 0.1 * g / (1 - 0.9)  # bias-corrected
    mean = torch.tensor([0.5, -1.0]) - 0.1 * (momentum + 0.01 * torch.tensor([0.5, -1.0])) / (
        h_new + 0.01
    )
    torch.testing.assert_close(p.detach(), mean)
    torch.testing.assert_close(optimizer.state[p]["hess"], h_new)


def test_ivon_recovers_the_linear_regression_posterior_and_exports_it():
    """IVON with ess = N and weight decay 1 / N (prior N(0, 1)) on the mean squared loss
    has the exact mean-field posterior sigma_i^2 = 1 / (A_ii + 1) as its fixed point."""
    torch.manual_seed(0)
    x, y = _regression()
    tau, n = 0.5, len(x)
    sigma = (1.0 / ((x.T @ x).diagonal() / tau**2 + 1.0)).sqrt()
    net = nn.Linear(3, 1, bias=False, dtype=torch.float64)
    optimizer = IVON(
        net.parameters(), lr=0.5, ess=n, weight_decay=1.0 / n, hess_init=1.0, beta2=0.95
    )
    trace = []
    for step in range(3500):
        optimizer.zero_grad()
        with sampling_step(optimizer):
            loss = dwp.likelihoods.gaussian_nll(net(x)[:, 0], y, tau) / n
            loss.backward()
        optimizer.step()
        if step >= 500:
            trace.append(optimizer.posterior_scale(net.weight).detach()[0].log().clone())
    error = _log_rms(trace) - sigma.log()
    tolerance = 5 * _standard_error(trace)
    assert (error.abs() < tolerance).all(), (error, tolerance)
    assert (tolerance < 0.1).all()
    with pytest.raises(RuntimeError, match="sampled_params"):
        optimizer.step()
    bayes = to_bayesian(net, optimizer)
    assert isinstance(bayes, dwp.BayesLinear)
    torch.testing.assert_close(bayes.weight_log_sigma, optimizer.posterior_scale(net.weight).log())
    torch.testing.assert_close(bayes.weight_prior.scale, torch.tensor(1.0))
    bayes.eval()
    torch.testing.assert_close(bayes(x), net(x))
