"""Effect handlers of pyro_bmr, one Messenger per module, each with its function form.

* :class:`PruneMessenger` / :func:`prune`: pruned elements become a point mass at
  zero in a model or guide;
* :class:`LocalReparameterizationMessenger` / :func:`local_reparameterization`:
  linear and convolution layers computed from their weights' Gaussian posterior,
  the weights' KL in closed form;
* :class:`PriorScaleMessenger` / :func:`prior_scale`: Gaussian sites run under
  their prior scale multiplied elementwise, non-centred (the reduced prior of
  :class:`~pyro_bmr.horseshoe_reduction.HorseshoeReduction`).
"""

from pyro_bmr.poutine.local_reparam_messenger import (
    LocalReparameterizationMessenger,
    local_reparameterization,
)
from pyro_bmr.poutine.prior_scale_messenger import PriorScaleMessenger, prior_scale
from pyro_bmr.poutine.prune_messenger import PruneMessenger, prune

__all__ = [
    "LocalReparameterizationMessenger",
    "PriorScaleMessenger",
    "PruneMessenger",
    "local_reparameterization",
    "prior_scale",
    "prune",
]
