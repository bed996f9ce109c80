"""Small Pyro models shared by the tests."""

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroSample
from pyro.optim import Adam


def fit(model, guide, *args, steps=300, lr=0.05, loss=None, bmr=None):
    """SVI with Adam for ``steps`` steps (through the handler ``bmr`` if given)."""
    wrap = (lambda f: f) if bmr is None else bmr
    svi = SVI(wrap(model), wrap(guide), Adam({"lr": lr}), loss or Trace_ELBO())
    for _ in range(steps):
        svi.step(*args)
    return svi


def regression_model(X, y=None, noise=0.5):
    d = X.shape[-1]
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([d]).to_event(1))
    with pyro.plate("data", X.shape[0]):
        # written for any leading batch of w, e.g. vectorised particles
        pyro.sample("y", dist.Normal((X * w.unsqueeze(-2)).sum(-1), noise), obs=y)


def counted(model):
    """``model`` that records each call in the returned list."""
    calls = []

    def run(*args, **kwargs):
        calls.append(1)
        return model(*args, **kwargs)

    return run, calls


def autonormal_at(model, locs, scales, *args):
    """An ``AutoNormal`` of ``model`` (called with ``args``) whose sites ``locs`` keys
    have those posterior locations and scales (name → tensor)."""
    guide = AutoNormal(model)
    guide(*args)
    with torch.no_grad():
        for name in locs:
            pyro.param(f"AutoNormal.locs.{name}").unconstrained().copy_(locs[name])
            # AutoNormal's scales are softplus-positive
            unconstrained = torch.log(torch.expm1(scales[name]))
            pyro.param(f"AutoNormal.scales.{name}").unconstrained().copy_(unconstrained)
    return guide


def subsampled_model(X, y=None, batch=64):
    """Global weights plus a per-datum offset in a subsampled plate."""
    d = X.shape[-1]
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([d]).to_event(1))
    with pyro.plate("data", X.shape[0], subsample_size=batch) as idx:
        z = pyro.sample("z", dist.Normal(0.0, 0.1))
        pyro.sample("y", dist.Normal(X[idx] @ w + z, 0.5), obs=None if y is None else y[idx])


class BayesianMLP(PyroModule):
    def __init__(self, d_in=4, d_hidden=8, d_out=3):
        super().__init__()
        self.fc1 = PyroModule[torch.nn.Linear](d_in, d_hidden)
        self.fc1.weight = PyroSample(dist.Normal(0.0, 1.0).expand([d_hidden, d_in]).to_event(2))
        self.fc1.bias = PyroSample(dist.Normal(0.0, 1.0).expand([d_hidden]).to_event(1))
        self.fc2 = PyroModule[torch.nn.Linear](d_hidden, d_out)
        self.fc2.weight = PyroSample(dist.Normal(0.0, 1.0).expand([d_out, d_hidden]).to_event(2))
        self.fc2.bias = PyroSample(dist.Normal(0.0, 1.0).expand([d_out]).to_event(1))

    def forward(self, x, y=None):
        logits = self.fc2(torch.relu(self.fc1(x)))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Categorical(logits=logits), obs=y)
        return logits
