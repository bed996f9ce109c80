"""Effect handlers of pyro_bmr, one Messenger per module, each with its function form.

* :class:`PruneMessenger` / :func:`prune`: pruned elements become a point mass at
  zero in a model or guide;
* :class:`LocalReparameterizationMessenger` / :func:`local_reparameterization`:
  linear and convolution layers computed from their weights' Gaussian posterior,
  the weights' KL in closed form.
"""

from pyro_bmr.poutine.local_reparam_messenger import (
    LocalReparameterizationMessenger,
    local_reparameterization,
)
from pyro_bmr.poutine.prune_messenger import PruneMessenger, prune

__all__ = [
    "LocalReparameterizationMessenger",
    "PruneMessenger",
    "local_reparameterization",
    "prune",
]
