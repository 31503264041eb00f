"""Monte Carlo prediction: predictive moments, entropy decomposition, state handling
(the ECE's tests moved with it to test_uncertainty.py)."""

import math

import pytest
import torch
from torch import nn

import dwp
from dwp.predict import entropy


class _Cycle:
    """A callable 'model' returning preset outputs in turn (exact expectations)."""

    def __init__(self, outputs):
        self.outputs, self.i = outputs, 0

    def __call__(self, x):
        out = self.outputs[self.i % len(self.outputs)]
        self.i += 1
        return out


def test_regression_moments_match_the_analytic_predictive():
    torch.manual_seed(0)
    layer = dwp.BayesLinear(4, 2, init_log_sigma=-1.0)
    x = torch.randn(3, 4)
    n = 4000
    pred = dwp.predict(layer, x, n_samples=n, task="regression")
    mean = nn.functional.linear(x, layer.weight, layer.bias)
    var = nn.functional.linear(x**2, layer.weight_posterior.scale**2)
    z_mean = (pred.mean - mean) / (var / n).sqrt()
    z_var = (pred.variance - var) / (var * math.sqrt(2 / (n - 1)))
    assert z_mean.abs().max() < 5 and z_var.abs().max() < 5
    assert pred.n_samples == n and pred.mutual_information is None


def test_entropy_decomposition_on_known_outputs():
    p1, p2 = torch.tensor([[0.9, 0.1]]), torch.tensor([[0.2, 0.8]])
    model = _Cycle([p1.log(), p2.log()])
    pred = dwp.predict(model, torch.zeros(1), n_samples=2, task="classification")
    mean = (p1 + p2) / 2
    h = lambda p: -(p * p.log()).sum(1)  # noqa: E731
    torch.testing.assert_close(pred.mean, mean)
    torch.testing.assert_close(pred.predictive_entropy, h(mean))
    torch.testing.assert_close(pred.expected_entropy, (h(p1) + h(p2)) / 2)
    torch.testing.assert_close(pred.mutual_information, h(mean) - (h(p1) + h(p2)) / 2)
    torch.testing.assert_close(pred.variance, (p1 - p2) ** 2 / 2)  # unbiased, n = 2


def test_sigmoid_entropies_are_per_channel():
    logits = torch.tensor([[[0.0, 3.0]]])
    pred = dwp.predict(
        _Cycle([logits]), None, n_samples=3, task="classification", activation="sigmoid"
    )
    p = torch.sigmoid(logits)
    expected = -(p * p.log() + (1 - p) * (1 - p).log())
    torch.testing.assert_close(pred.predictive_entropy, expected)
    torch.testing.assert_close(
        pred.mutual_information, torch.zeros_like(expected), atol=1e-6, rtol=0
    )


def test_segmentation_shapes_and_epistemic_signal():
    torch.manual_seed(0)
    net = dwp.bayesianize(nn.Conv3d(1, 3, 3, padding=1), init_log_sigma=0.0)
    x = torch.randn(2, 1, 4, 4, 4)
    pred = dwp.predict(net, x, n_samples=6, task="classification")
    assert pred.mean.shape == (2, 3, 4, 4, 4)
    assert pred.predictive_entropy.shape == pred.mutual_information.shape == (2, 4, 4, 4)
    torch.testing.assert_close(pred.mean.sum(1), torch.ones(2, 4, 4, 4))
    assert (pred.mutual_information > 0).all()  # sigma = 1: the samples disagree


def test_predict_restores_the_model_state_and_handles_deterministic_models():
    torch.manual_seed(0)
    net = dwp.bayesianize(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Linear(3, 1)))
    net.train()
    x = torch.randn(5, 3)
    pred = dwp.predict(net, x, n_samples=4, task="regression")
    assert net.training and pred.n_samples == 4
    assert all(layer.mode is dwp.Mode.AUTO for _, layer in dwp.bayesian_layers(net))
    mean_pass = dwp.predict(net, x, sample=False, task="regression")
    assert mean_pass.n_samples == 1
    net.eval()
    torch.testing.assert_close(mean_pass.mean, net(x))
    plain = nn.Linear(3, 1)
    det = dwp.predict(plain, x, n_samples=10, task="regression")
    assert det.n_samples == 1 and torch.equal(det.variance, torch.zeros(5, 1))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"n_samples": 0}, "n_samples"),
        ({"task": "x"}, "task"),
        ({"activation": "relu"}, "activation"),
    ],
)
def test_predict_rejects_bad_arguments(kwargs, error):
    with pytest.raises(ValueError, match=error):
        dwp.predict(nn.Linear(2, 2), torch.randn(1, 2), **{"task": "regression", **kwargs})


def test_predict_needs_the_task():
    # no silent default: a classifier's logits averaged as a regression would give a
    # mean of logits and no entropies
    logits = torch.tensor([[2.0, -1.0]])
    with pytest.raises(TypeError, match=r"task='classification'.*task='regression'"):
        dwp.predict(_Cycle([logits]), None, n_samples=2)
    pred = dwp.predict(_Cycle([logits]), None, n_samples=2, task="classification")
    torch.testing.assert_close(pred.mean, logits.softmax(1))


def test_entropy_handles_zero_probabilities():
    assert entropy(torch.tensor([[1.0, 0.0]])).item() == 0.0
    assert entropy(torch.tensor([[0.5, 0.5]])).item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("variance", [True, False])
def test_streaming_statistics_equal_the_stacked_ones(variance):
    """PredictiveStatistics (used by dwp.predict and unet3d's sliding windows) against the
    statistics of all passes held at once."""
    torch.manual_seed(0)
    passes = torch.randn(7, 2, 3, 4, 4).softmax(1)  # 7 passes of (B, C, D, H) probabilities
    stats = dwp.PredictiveStatistics("classification", variance=variance)
    for p in passes:
        stats.update(p)
    result = stats.result()
    torch.testing.assert_close(result.mean, passes.mean(0))
    expected_var = passes.var(0) if variance else torch.zeros_like(passes[0])
    torch.testing.assert_close(result.variance, expected_var)
    total = entropy(passes.mean(0))
    torch.testing.assert_close(result.predictive_entropy, total)
    aleatoric = torch.stack([entropy(p) for p in passes]).mean(0)
    torch.testing.assert_close(result.expected_entropy, aleatoric)
    torch.testing.assert_close(result.mutual_information, (total - aleatoric).clamp_min(0))
    assert result.n_samples == 7 and result.mean.dtype == torch.float32


def test_streaming_statistics_need_an_output_and_a_known_task():
    with pytest.raises(ValueError, match="no output added"):
        dwp.PredictiveStatistics().result()
    with pytest.raises(ValueError, match="task"):
        dwp.PredictiveStatistics("segmentation")
