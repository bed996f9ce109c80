import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyro_bmr import MaskError
from pyro_bmr.poutine import PruneMessenger, prune


def _model():
    w = pyro.sample("w", dist.Normal(torch.zeros(4), 2.0).to_event(1))
    with pyro.plate("rows", 6, subsample_size=3) as rows:
        v = pyro.sample("v", dist.Normal(0.0, 1.0))
    return w, v, rows


def test_function_form_pins_pruned_elements_to_zero_with_no_log_prob():
    keep = torch.tensor([True, False, True, False])
    pyro.set_rng_seed(0)
    trace = poutine.trace(prune(_model, {"w": keep})).get_trace()
    w = trace.nodes["w"]["value"]
    assert (w[~keep] == 0).all() and (w[keep] != 0).all()
    expected = dist.Normal(0.0, 2.0).log_prob(w[keep]).sum()
    assert torch.allclose(trace.nodes["w"]["fn"].log_prob(w), expected)
    assert isinstance(prune(masks={"w": keep}), PruneMessenger)


def test_masks_follow_plate_subsampling():
    keep = torch.tensor([True, False, True, False, True, False])
    trace = poutine.trace(prune(_model, {"v": keep})).get_trace()
    rows = trace.nodes["rows"]["value"]
    v = trace.nodes["v"]["value"]
    assert torch.equal(v == 0, ~keep[rows])


def test_masks_are_a_read_only_view_replaced_as_a_whole():
    messenger = PruneMessenger({"w": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(TypeError):
        messenger.masks["w"] = torch.zeros(4, dtype=torch.bool)
    messenger.masks = {"w": torch.tensor([False, True, True, True])}
    with messenger:
        w = _model()[0]
    assert w[0] == 0 and (w[1:] != 0).all()
    with pytest.raises(MaskError, match="site 'w' must be a bool tensor"):
        messenger.masks = {"w": torch.ones(4)}


def test_a_mask_that_does_not_fit_names_the_site():
    with pytest.raises(MaskError, match="mask of shape \\(3,\\) does not fit site 'w'"):
        prune(_model, {"w": torch.ones(3, dtype=torch.bool)})()
