"""Property: for random small models, every reducible site's ΔF is the closed form on
the prior the model runs with and on the guide's marginals, and every other latent
site is reported as skipped with a reason.

The oracle is independent of the library: it knows each site's prior from the
model's specification (tempering and learned scales included), reads the guide's
marginals from Pyro's param store, and evaluates the Savage–Dickey ratio
ln q(0) − ln p(0) with ``torch.distributions.Normal`` in float64.
"""

import math
import warnings

import pyro
import pyro.distributions as dist
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyro import poutine
from pyro.infer.autoguide import AutoNormal

from pyro_bmr import BayesianModelReduction

KINDS = ("gaussian", "learned", "tempered", "hierarchical", "gamma", "local")

site_specs = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(KINDS),
        "size": st.integers(1, 4),
        "loc": st.floats(-2.0, 2.0),
        "scale": st.floats(0.1, 3.0),
        "beta": st.sampled_from([0.01, 0.5, 2.0]),
    }
)
model_specs = st.fixed_dictionaries(
    {
        "sites": st.lists(site_specs, min_size=1, max_size=5),
        "num_data": st.integers(4, 12),
        "subsample": st.booleans(),
        "local_latents": st.booleans(),
    }
)


def _build(spec):
    sites = [dict(s, name=f"s{i}") for i, s in enumerate(spec["sites"])]
    n = spec["num_data"]
    batch = n // 2 if spec["subsample"] else None

    def model(x):
        total = torch.zeros(())
        for s in sites:
            name, shape = s["name"], [s["size"]]
            if s["kind"] == "gamma":
                v = pyro.sample(name, dist.Gamma(2.0, 1.0).expand(shape).to_event(1))
            elif s["kind"] == "hierarchical":
                tau = pyro.sample(name + "_tau", dist.LogNormal(0.0, 1.0))
                v = pyro.sample(name, dist.Normal(s["loc"], tau).expand(shape).to_event(1))
            elif s["kind"] == "learned":
                scale = pyro.param(
                    name + "_prior_scale",
                    torch.tensor(s["scale"]),
                    constraint=dist.constraints.positive,
                )
                v = pyro.sample(name, dist.Normal(s["loc"], scale).expand(shape).to_event(1))
            elif s["kind"] == "tempered":
                with poutine.scale(scale=s["beta"]):
                    v = pyro.sample(
                        name, dist.Normal(s["loc"], s["scale"]).expand(shape).to_event(1)
                    )
            elif s["kind"] == "local":
                continue
            else:
                v = pyro.sample(name, dist.Normal(s["loc"], s["scale"]).expand(shape).to_event(1))
            total = total + v.sum()
        with pyro.plate("data", n, subsample_size=batch) as idx:
            for s in sites:
                if s["kind"] == "local":
                    total = total + pyro.sample(s["name"], dist.Normal(s["loc"], s["scale"]))
            pyro.sample("y", dist.Normal(total, 1.0), obs=x[idx])

    return sites, model


def _expected_prior(s):
    """(m, s) of the prior the ELBO fits against, from the specification alone."""
    if s["kind"] == "learned":
        return s["loc"], float(pyro.param(s["name"] + "_prior_scale"))
    if s["kind"] == "tempered":
        return s["loc"], s["scale"] / math.sqrt(s["beta"])
    return s["loc"], s["scale"]


@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(spec=model_specs, seed=st.integers(0, 2**16))
def test_delta_f_is_the_closed_form_on_the_prior_the_model_runs_with(spec, seed):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    sites, model = _build(spec)
    x = torch.randn(spec["num_data"])
    guide = AutoNormal(model)
    guide(x)
    bmr = BayesianModelReduction(guide, local_latents=spec["local_latents"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the guide is at its initialisation
        bmr.reduce(x)  # finds the sites; the second reduction must read priors afresh
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a posterior anywhere, not at its initialisation
        for name, p in pyro.get_param_store().items():
            if name.startswith("AutoNormal."):
                u = p.unconstrained()
                u.copy_(
                    torch.randn(u.shape, generator=g) * 0.5 + (0.0 if ".locs." in name else -1.0)
                )
            elif name.endswith("_prior_scale"):  # a learned prior that has moved
                p.unconstrained().add_(torch.randn((), generator=g))
    marginals = {  # read before the reduction zeroes the pruned locations
        s["name"]: (
            pyro.param(f"AutoNormal.locs.{s['name']}").detach().double().clone(),
            pyro.param(f"AutoNormal.scales.{s['name']}").detach().double().clone(),
        )
        for s in sites
        if s["kind"] in ("gaussian", "learned", "tempered", "local")
    }
    expected_priors = {s["name"]: _expected_prior(s) for s in sites}
    report = bmr.reduce(x)

    reducible = {
        s["name"]
        for s in sites
        if s["kind"] in ("gaussian", "learned", "tempered")
        or (s["kind"] == "local" and spec["local_latents"])
    }
    assert set(report.delta_f) == reducible
    latent = {s["name"] for s in sites} | {
        s["name"] + "_tau" for s in sites if s["kind"] == "hierarchical"
    }
    assert set(report.skipped) == latent - reducible
    assert all(isinstance(why, str) and why for why in report.skipped.values())
    for s in sites:
        if s["kind"] in ("hierarchical", "gamma"):
            assert s["name"] in report.skipped
    for s in sites:
        if s["name"] not in reducible:
            continue
        name = s["name"]
        m, sd = expected_priors[name]
        mu, sigma = marginals[name]
        zero = torch.zeros((), dtype=torch.float64)
        expected = torch.distributions.Normal(mu, sigma).log_prob(
            zero
        ) - torch.distributions.Normal(
            torch.tensor(m, dtype=torch.float64), torch.tensor(sd, dtype=torch.float64)
        ).log_prob(zero)
        got = report.delta_f[name].double()
        assert got.shape == expected.shape, name
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4), (name, s, got, expected)
