import logging

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.optim import Adam

from pyro_bmr import (
    BayesianModelReduction,
    CompiledTrace_ELBO,
    CompiledTraceMeanField_ELBO,
    StochasticBMR,
    ThresholdRule,
)
from pyro_bmr.compiled_elbo import _Step
from pyro_bmr.guides import make_guide
from pyro_bmr.nn import BayesianClassifier, GaussianPrior, LayerHorseshoePrior
from tests.models import BayesianMLP, regression_model, subsampled_model


def _classifier(guide_kind="auto", prior=None, dropout=0.0):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(12, 16),
        torch.nn.Dropout(dropout),
        torch.nn.SiLU(),
        torch.nn.Linear(16, 3),
    )
    model = BayesianClassifier(net, 500, prior or GaussianPrior(1.0))
    guide, training = make_guide(model, guide_kind, init_scale=0.05)
    x = torch.randn(24, 12)
    y = torch.randint(0, 3, (24,))
    return model, guide, training, (x, y)


def _losses_and_grads(elbo, model, guide, args, calls=4, seed=1):
    """``calls`` evaluations of the loss and its gradients, without optimising."""
    pyro.set_rng_seed(seed)
    out = []
    for _ in range(calls):
        with pyro.poutine.trace(param_only=True) as params:
            loss = elbo.loss_and_grads(model, guide, *args)
        leaves = {n: s["value"].unconstrained() for n, s in params.trace.nodes.items()}
        out.append((loss, {n: leaf.grad.clone() for n, leaf in leaves.items()}))
        for leaf in leaves.values():
            leaf.grad = None
    return out


def _assert_replays_the_plain_elbo(model, guide, args, losses_only=False):
    """The fx-backend compiled ELBO captures a step and gives Trace_ELBO's losses
    (and gradients) for the same seed."""
    elbo = CompiledTrace_ELBO(backend="fx")
    got = _losses_and_grads(elbo, model, guide, args)
    expected = _losses_and_grads(Trace_ELBO(), model, guide, args)
    assert any(isinstance(v, _Step) for v in elbo.compiled.values())
    for (loss, grads), (loss0, grads0) in zip(got, expected):
        assert loss == pytest.approx(loss0, rel=1e-6)
        if not losses_only:
            for name in grads:
                torch.testing.assert_close(grads[name], grads0[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("guide_kind", ["auto", "mean-field", "local"])
@pytest.mark.parametrize("compiled, plain", [
    (CompiledTrace_ELBO, Trace_ELBO),
    (CompiledTraceMeanField_ELBO, TraceMeanField_ELBO),
])  # fmt: skip
def test_replays_the_plain_elbos_loss_and_gradients_draw_for_draw(guide_kind, compiled, plain):
    model, guide, training, args = _classifier(guide_kind)
    bmr = BayesianModelReduction(guide, model=model)
    with training:
        bmr.sites(*args)
        bmr.set_mask("net.1.weight", torch.rand(16, 12) > 0.5)
        # local reparameterisation learns at its first step which layers it can take
        # over: let it, so that both sequences below start from the same state
        plain().differentiable_loss(bmr(model), bmr(guide), *args)
        elbo = compiled(backend="fx")
        got = _losses_and_grads(elbo, bmr(model), bmr(guide), args)
        expected = _losses_and_grads(plain(), bmr(model), bmr(guide), args)
    # the first call runs eagerly, the second captures, the others replay
    assert sum(isinstance(v, _Step) for v in elbo.compiled.values()) == 1
    for (loss, grads), (loss0, grads0) in zip(got, expected):
        assert loss == pytest.approx(loss0, rel=1e-6)
        assert grads.keys() == grads0.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], grads0[name], rtol=1e-6, atol=1e-6)
    assert got[2][0] != got[3][0]  # fresh random draws at every replay


def test_inductor_agrees_with_the_plain_elbo():
    model, guide, _, args = _classifier("auto")
    guide(*args)
    elbo = CompiledTrace_ELBO(backend="inductor")
    got = _losses_and_grads(elbo, model, guide, args)
    expected = _losses_and_grads(Trace_ELBO(), model, guide, args)
    step = next(v for v in elbo.compiled.values() if isinstance(v, _Step))
    assert step.backend == "inductor"  # compiled, not fallen back
    for (loss, grads), (loss0, grads0) in zip(got, expected):
        assert loss == pytest.approx(loss0, rel=1e-5)
        for name in grads:
            torch.testing.assert_close(grads[name], grads0[name], rtol=1e-4, atol=1e-5)


def test_horseshoe_model_agrees():
    """Tiered-FF's hierarchical prior gets the same treatment."""
    model, guide, _, args = _classifier("auto", prior=LayerHorseshoePrior())
    guide(*args)
    _assert_replays_the_plain_elbo(model, guide, args)


def _train(loss, steps=30, epochs=3):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model, guide, training, args = _classifier("mean-field")
    trainer = StochasticBMR(model, guide, Adam({"lr": 0.05}), loss, rule=ThresholdRule(0.0))
    with training:
        trainer.fit(lambda: args, num_epochs=epochs, steps_per_epoch=steps, progress=False)
    return trainer, model, guide, args


def test_stochastic_bmr_trains_the_same_masks_and_keeps_pruned_elements_at_zero():
    compiled, model, guide, args = _train(CompiledTrace_ELBO(backend="fx"))
    assert isinstance(compiled.loss, CompiledTrace_ELBO)
    masks = {name: mask.clone() for name, mask in compiled.bmr.masks.items()}
    locs = {name: loc.detach().clone() for name, loc in guide.median(*args).items()}
    plain, _, plain_guide, _ = _train(Trace_ELBO())
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert pruned > 0
    for name, mask in plain.bmr.masks.items():
        assert torch.equal(mask, masks[name]), name
    for name, loc in plain_guide.median(*args).items():
        torch.testing.assert_close(locs[name], loc.detach(), rtol=1e-5, atol=1e-6)
    # after the last reduction: pruned elements get exactly zero gradient, sample as
    # exactly zero, and Predictive draws them as zero
    compiled.step(*args)
    with pyro.poutine.trace(param_only=True) as params:
        compiled.loss.loss_and_grads(compiled.bmr(model), compiled.bmr(guide), *args)
    (loc,) = [s["value"].unconstrained() for n, s in params.trace.nodes.items() if "loc" in n]
    flat_mask = torch.cat([masks[name].reshape(-1) for name in guide.median(*args)])
    assert loc.grad.shape == flat_mask.shape
    assert torch.all(loc.grad[~flat_mask] == 0) and loc.grad[flat_mask].abs().sum() > 0
    samples = Predictive(compiled.bmr(model), guide=compiled.bmr(guide), num_samples=5)(*args)
    for name, mask in masks.items():
        assert torch.all(samples[name].reshape(5, *mask.shape)[:, ~mask] == 0), name


def test_a_reduction_outside_stochastic_bmr_makes_the_elbo_capture_again():
    """Masks are baked into the captured graph: newly pruned locations must not drift."""
    X = torch.randn(200, 6)
    y = X @ torch.tensor([2.0, 0.0, -1.0, 0.0, 0.0, 1.5]) + 0.5 * torch.randn(200)
    guide = AutoNormal(regression_model)
    bmr = BayesianModelReduction(guide, ThresholdRule(0.0))
    elbo = CompiledTrace_ELBO(backend="fx")
    svi = SVI(bmr(regression_model), bmr(guide), Adam({"lr": 0.05}), elbo)
    for _ in range(300):
        svi.step(X, y)
    assert any(isinstance(v, _Step) for v in elbo.compiled.values())
    report = bmr.reduce(X, y)
    assert report.num_pruned > 0 and not elbo.compiled  # forgotten at the reduction
    for _ in range(20):
        svi.step(X, y)
    assert any(isinstance(v, _Step) for v in elbo.compiled.values())
    loc = pyro.param("AutoNormal.locs.w").unconstrained()
    loc.grad = None
    svi.loss_and_grads(svi.model, svi.guide, X, y)
    pruned = ~bmr.masks["w"]
    assert torch.all(loc.grad[pruned] == 0) and loc.grad[~pruned].abs().min() > 0


def test_captures_again_when_shapes_or_training_mode_change():
    model, guide, _, (x, y) = _classifier("auto", dropout=0.5)
    guide(x, y)
    elbo = CompiledTrace_ELBO(backend="fx")
    for batch in ((x, y), (x[:10], y[:10])):
        for training in (True, False):
            model.train(training)
            got = _losses_and_grads(elbo, model, guide, batch, calls=3, seed=2)
            model.train(training)
            expected = _losses_and_grads(Trace_ELBO(), model, guide, batch, calls=3, seed=2)
            for (loss, _), (loss0, _) in zip(got, expected):
                assert loss == pytest.approx(loss0, rel=1e-6)
    assert sum(isinstance(v, _Step) for v in elbo.compiled.values()) == 4


def test_new_parameters_are_learnt_again():
    X = torch.randn(50, 4)
    elbo = CompiledTrace_ELBO(backend="fx")
    for _ in range(2):
        pyro.clear_param_store()
        guide = AutoNormal(regression_model)
        guide(X)
        got = _losses_and_grads(elbo, regression_model, guide, (X,), seed=3)
        expected = _losses_and_grads(Trace_ELBO(), regression_model, guide, (X,), seed=3)
        for (loss, grads), (loss0, grads0) in zip(got, expected):
            assert loss == pytest.approx(loss0, rel=1e-6)
            for name in grads:
                torch.testing.assert_close(grads[name], grads0[name])


def test_falls_back_to_the_plain_elbo_with_a_logged_warning(caplog):
    def reads_a_value(X, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[-1]]).to_event(1))
        noise = 0.5 if w[0].item() > 0 else 1.0  # Python reads a tensor's value
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", dist.Normal(X @ w, noise), obs=y)

    X, y = torch.randn(30, 3), torch.randn(30)
    guide = AutoNormal(reads_a_value)
    guide(X, y)
    elbo = CompiledTrace_ELBO(backend="fx")
    with caplog.at_level(logging.WARNING, logger="pyro_bmr.compiled_elbo"):
        got = _losses_and_grads(elbo, reads_a_value, guide, (X, y), calls=5)
    expected = _losses_and_grads(Trace_ELBO(), reads_a_value, guide, (X, y), calls=5)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "reads_a_value" in warnings[0]
    assert "plain ELBO" in warnings[0]
    assert list(elbo.compiled.values()) == ["failed"]
    for (loss, grads), (loss0, grads0) in zip(got, expected):
        assert loss == loss0  # the very same draws: capturing consumed none
        for name in grads:
            assert torch.equal(grads[name], grads0[name])


def test_subsampled_plates_and_pyro_modules_agree():
    X, y = torch.randn(300, 5), torch.randn(300)
    guide = AutoNormal(subsampled_model)
    guide(X, y)
    # the same random subsample too
    _assert_replays_the_plain_elbo(subsampled_model, guide, (X, y), losses_only=True)
    pyro.clear_param_store()
    # PyroSample priors built while validation is on check every value they score
    with pyro.validation_enabled(True):
        net = BayesianMLP()
    x, labels = torch.randn(20, 4), torch.randint(0, 3, (20,))
    guide = AutoNormal(net)
    guide(x, labels)
    _assert_replays_the_plain_elbo(net, guide, (x, labels), losses_only=True)


def test_the_models_python_runs_only_when_capturing():
    """The documented price of replaying: side effects of the model's Python code run
    at the eager step and the capture, not at the replays."""
    calls = []

    def counted(X, y=None):
        calls.append(1)
        regression_model(X, y)

    X, y = torch.randn(20, 3), torch.randn(20)
    guide = AutoNormal(counted)
    guide(X, y)
    calls.clear()
    elbo = CompiledTrace_ELBO(backend="fx")
    svi = SVI(counted, guide, Adam({"lr": 0.01}), elbo)
    for _ in range(6):
        svi.step(X, y)
    assert len(calls) == 2
    elbo.forget()
    svi.step(X, y)
    assert len(calls) == 3


def test_eager_backend_and_bad_backends():
    X, y = torch.randn(20, 3), torch.randn(20)
    guide = AutoNormal(regression_model)
    guide(X, y)
    elbo = CompiledTrace_ELBO(backend="eager")
    got = _losses_and_grads(elbo, regression_model, guide, (X, y))
    expected = _losses_and_grads(Trace_ELBO(), regression_model, guide, (X, y))
    assert [loss for loss, _ in got] == [loss for loss, _ in expected]
    assert not any(isinstance(v, _Step) for v in elbo.compiled.values())
    with pytest.raises(ValueError, match="unknown backend 'jit'; choose one of inductor, fx"):
        CompiledTrace_ELBO(backend="jit")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["fx", "inductor"])
def test_cuda_agrees_with_the_plain_elbo(backend):
    model, guide, _, args = _classifier("auto")
    model.cuda()
    args = tuple(a.cuda() for a in args)
    guide(*args)
    got = _losses_and_grads(CompiledTrace_ELBO(backend=backend), model, guide, args)
    expected = _losses_and_grads(Trace_ELBO(), model, guide, args)
    for (loss, grads), (loss0, grads0) in zip(got, expected):
        assert loss == pytest.approx(loss0, rel=1e-5)
        for name in grads:
            assert grads[name].is_cuda
            torch.testing.assert_close(grads[name], grads0[name], rtol=1e-4, atol=1e-5)


def test_gradients_accumulate_into_those_held_like_backward():
    """Held gradients are added to, inside the graph or outside it, as by backward."""
    X, y = torch.randn(40, 5), torch.randn(40)
    guide = AutoNormal(regression_model)
    guide(X, y)
    names = ["AutoNormal.locs.w", "AutoNormal.scales.w"]
    leaves = [pyro.param(n).unconstrained() for n in names]

    def run(elbo, holding):
        pyro.set_rng_seed(5)
        grads = []
        for holds in holding:  # call 1 is eager, call 2 captures, the rest replay
            for leaf in leaves:
                leaf.grad = torch.full_like(leaf, 0.25) if holds else None
            elbo.loss_and_grads(regression_model, guide, X, y)
            grads.append([leaf.grad.clone() for leaf in leaves])
        return grads

    # captured holding gradients (as under SVI, whose zero_grads leaves zeros), or not
    for holding in ([False, True, True, False, True], [False, False, True, True, False]):
        got = run(CompiledTrace_ELBO(backend="fx"), holding)
        expected = run(Trace_ELBO(), holding)
        for g, g0 in zip(got, expected):
            for a, b in zip(g, g0):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
