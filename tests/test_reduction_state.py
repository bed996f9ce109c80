"""Masks set, reset, saved and restored: each path keeps or refuses, never loses."""

import re

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

from pyro_bmr import BayesianModelReduction, MaskError

from .models import regression_model


def _sized_model(X, y=None, *, d):
    """The number of weights is a keyword-only argument."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([d]).to_event(1))
    v = pyro.sample("v", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with pyro.plate("data", X.shape[0]):
        mean = (X[..., :d] * w.unsqueeze(-2)).sum(-1) + v.sum(-1, keepdim=True)
        pyro.sample("y", dist.Normal(mean, 0.5), obs=y)


def _data(n=40, d=3):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=g)
    return X, X @ torch.tensor([2.0, 0.0, -1.0]) + 0.5 * torch.randn(n, generator=g)


def _masks():
    return {"w": torch.tensor([True, False, True]), "v": torch.tensor([False, True])}


def test_set_mask_before_the_sites_are_known_names_what_to_call():
    bmr = BayesianModelReduction(AutoNormal(regression_model))
    with pytest.raises(MaskError, match=r"^set_mask needs the sites: call reduce\(\) or sites"):
        bmr.set_mask("w", torch.ones(3, dtype=torch.bool))


def test_reset_forgets_only_the_named_sites_and_ignores_unmasked_ones():
    X, y = _data()
    guide = AutoNormal(_sized_model)
    bmr = BayesianModelReduction(guide)
    guide(X, y, d=3)
    bmr.sites(X, y, d=3)
    for name, mask in _masks().items():
        bmr.set_mask(name, mask)
    bmr.reset(["v"])
    assert set(bmr.masks) == {"w"} and torch.equal(bmr.masks["w"], _masks()["w"])
    bmr.reset(["v"])  # no mask left there: nothing to forget, no error
    bmr.reset()
    assert dict(bmr.masks) == {}


def test_state_dict_returns_masks_still_waiting_for_their_check():
    bmr = BayesianModelReduction(AutoNormal(_sized_model))  # guide not run: no shapes yet
    bmr.load_state_dict({"masks": _masks()})
    state = bmr.state_dict()
    assert set(state["masks"]) == {"w", "v"}
    for name, mask in _masks().items():
        assert torch.equal(state["masks"][name], mask)


@pytest.mark.parametrize("state", [[("masks", {})], "masks", None, {"mask": {}}])
def test_load_state_dict_refuses_what_state_dict_does_not_make(state):
    bmr = BayesianModelReduction(AutoNormal(regression_model))
    with pytest.raises(
        ValueError, match=r"^state must be a dict with a 'masks' entry, as state_dict\(\) returns$"
    ):
        bmr.load_state_dict(state)


def test_pending_masks_survive_a_check_that_is_too_early_then_install():
    X, y = _data()
    guide = AutoNormal(_sized_model)
    bmr = BayesianModelReduction(guide)
    bmr.load_state_dict({"masks": _masks()})
    with pytest.raises(MaskError, match="cannot be checked yet"):
        with bmr:
            pass
    assert set(bmr.state_dict()["masks"]) == {"w", "v"}  # still there
    # a run with the model's keyword arguments finds the sites and installs them
    bmr(guide)(X, y, d=3)
    assert set(bmr.masks) == {"w", "v"}
    assert torch.equal(bmr.masks["w"], _masks()["w"])
    assert bmr.sparsity().num_pruned == 2


@pytest.mark.parametrize("what", ["sparsity", "masks", "units"])
def test_pending_masks_name_the_call_that_needs_them_checked(what):
    bmr = BayesianModelReduction(AutoNormal(_sized_model))
    bmr.load_state_dict({"masks": _masks()})
    message = (
        f"{what}: the masks loaded by load_state_dict are checked against the model's sites "
        "at their first use; call sites(*args) (or reduce, or run bmr(model)) with the "
        "model's arguments first"
    )
    with pytest.raises(MaskError, match=f"^{re.escape(message)}$"):
        bmr.masks if what == "masks" else getattr(bmr, what)()


def test_reset_drops_masks_still_waiting_for_their_check():
    X, y = _data()
    guide = AutoNormal(_sized_model)
    bmr = BayesianModelReduction(guide)
    bmr.load_state_dict({"masks": _masks()})
    bmr.reset()
    assert bmr.state_dict()["masks"] == {} and dict(bmr.masks) == {}
    assert bmr.sparsity().num_pruned == 0
    bmr(guide)(X, y, d=3)  # nothing left to install
    assert dict(bmr.masks) == {}


def test_pending_masks_survive_a_run_that_fails_then_install():
    X, y = _data()
    guide = AutoNormal(_sized_model)
    bmr = BayesianModelReduction(guide)
    bmr.load_state_dict({"masks": _masks()})
    with pytest.raises(TypeError):
        bmr(guide)(X, y)  # the model's keyword argument d is missing
    assert set(bmr.state_dict()["masks"]) == {"w", "v"}  # still there
    bmr(guide)(X, y, d=3)
    assert torch.equal(bmr.masks["v"], _masks()["v"])
