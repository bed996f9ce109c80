"""Pyro's private API, as pyro_bmr._pyro_compat reads it, against the installed Pyro."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import JitTrace_ELBO, JitTraceGraph_ELBO, JitTraceMeanField_ELBO, Trace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from pyro.nn import PyroModule, PyroParam, PyroSample
from torch import nn
from torch.distributions import constraints

from pyro_bmr import _pyro_compat


def _model(x):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    with pyro.plate("data", x.shape[0], subsample_size=2):
        pyro.sample("z", dist.Normal(0.0, 1.0))
    return x @ w


def test_autoguide_prototype_shapes_prefix_and_plates():
    x = torch.randn(4, 3)
    guide = AutoDiagonalNormal(_model)
    assert getattr(guide, "prototype_trace", None) is None
    _pyro_compat.setup_prototype(guide, x)
    assert guide.prototype_trace is not None
    assert _pyro_compat.unconstrained_shapes(guide) == {"w": (3,), "z": (2,)}
    assert _pyro_compat.autoguide_prefix(guide) == "AutoDiagonalNormal"
    guide = AutoNormal(_model)
    _pyro_compat.setup_prototype(guide, x)
    plates = _pyro_compat.autoguide_plates(guide, x)
    assert set(plates) == {"data"} and plates["data"].subsample_size == 2
    no_plates = AutoNormal(lambda: pyro.sample("v", dist.Normal(0.0, 1.0)))
    _pyro_compat.setup_prototype(no_plates)
    assert _pyro_compat.autoguide_plates(no_plates) == {}


def test_pyro_module_attributes_and_back_to_torch():
    layer = PyroModule[nn.Linear](3, 2)
    layer.weight = PyroSample(dist.Normal(0.0, 1.0).expand([2, 3]).to_event(2))
    layer.bias = PyroParam(torch.ones(2), constraints.positive)
    assert _pyro_compat.module_prefix(layer) == ""
    assert _pyro_compat.random_attributes(layer) == ("weight",)
    layer(torch.ones(1, 3))  # a PyroModule names its sites once it has run
    assert _pyro_compat.random_site_name(layer, "weight") == "weight"
    assert _pyro_compat.param_attributes(layer) == {"bias": constraints.positive}
    raw = _pyro_compat.unconstrained_parameter(layer, "bias")
    assert torch.equal(raw, torch.distributions.biject_to(constraints.positive).inv(torch.ones(2)))
    _pyro_compat.to_torch_module_(
        layer, nn.Linear, {"weight": torch.zeros(2, 3), "bias": torch.ones(2)}
    )
    assert type(layer) is nn.Linear
    assert sorted(n for n, _ in layer.named_parameters()) == ["bias", "weight"]
    assert torch.equal(layer(torch.ones(1, 3)), torch.ones(1, 2))


@pytest.mark.parametrize("elbo", [JitTrace_ELBO, JitTraceGraph_ELBO, JitTraceMeanField_ELBO])
def test_forget_compiled_makes_a_jit_elbo_compile_again(elbo):
    def model():
        pyro.sample("w", dist.Normal(0.0, 1.0))

    guide = AutoNormal(model)
    loss = elbo()
    assert _pyro_compat.compiled_functions(loss) == []
    loss.loss_and_grads(model, guide)
    assert _pyro_compat.compiled_functions(loss)
    _pyro_compat.forget_compiled(loss)
    assert _pyro_compat.compiled_functions(loss) == []
    loss.loss_and_grads(model, guide)  # compiles again (a method of the ELBO is intact)
    assert _pyro_compat.compiled_functions(loss)
    _pyro_compat.forget_compiled(Trace_ELBO())  # a plain ELBO has nothing to forget


def test_autocallable_guide_and_param_constraint():
    from pyro.infer.autoguide import AutoCallable, AutoGuideList

    def part():
        pyro.sample("w", dist.Normal(pyro.param("w_loc", torch.zeros(())), 1.0))

    guides = AutoGuideList(_model)
    guides.append(part)  # a plain callable is wrapped in an AutoCallable
    assert isinstance(guides[0], AutoCallable)
    assert _pyro_compat.autocallable_guide(guides[0]) is part
    pyro.param("positive", torch.ones(2), constraint=constraints.positive)
    pyro.param("real", torch.zeros(2))
    assert _pyro_compat.param_constraint("positive") is constraints.positive
    assert _pyro_compat.param_constraint("real") is constraints.real
    # unlike the store's get_state, it leaves the weakref of a value handed out in place
    value = pyro.param("real")
    _pyro_compat.param_constraint("real")
    assert value.unconstrained() is value


class _Own(PyroModule):
    def __init__(self):
        super().__init__()
        self.layer = PyroModule[nn.Linear](3, 2)
        self.scale = PyroSample(dist.Normal(0.0, 1.0))
        self.shift = PyroParam(torch.ones(2), constraints.positive)

    def forward(self, x):
        return self.scale * self.layer(x) + self.shift


class _OwnLinear(PyroModule[nn.Linear]):
    pass


def test_converted_from_tells_converted_classes_from_a_users_own():
    assert _pyro_compat.converted_from(PyroModule[nn.Linear]) is nn.Linear
    assert _pyro_compat.converted_from(PyroModule[nn.Sequential]) is nn.Sequential
    assert _pyro_compat.converted_from(PyroModule) is nn.Module
    assert _pyro_compat.converted_from(_Own) is None
    assert _pyro_compat.converted_from(_OwnLinear) is None
    assert _pyro_compat.converted_from(nn.Linear) is None


def test_has_run_and_make_deterministic_keep_the_class():
    module = _Own()
    assert not _pyro_compat.has_run(module)
    module(torch.ones(1, 3))
    assert _pyro_compat.has_run(module) and _pyro_compat.has_run(module.layer)
    assert _pyro_compat.random_attributes(module) == ("scale",)
    _pyro_compat.make_deterministic_(module, {"scale": torch.tensor(2.0), "shift": torch.zeros(2)})
    assert type(module) is _Own
    assert _pyro_compat.random_attributes(module) == ()
    assert _pyro_compat.param_attributes(module) == {}
    assert sorted(n for n, _ in module.named_parameters(recurse=False)) == ["scale", "shift"]
    x = torch.randn(4, 3)
    with torch.no_grad():
        expected = 2.0 * nn.functional.linear(x, module.layer.weight, module.layer.bias)
        assert torch.equal(module(x), expected)  # still a PyroModule: it runs
