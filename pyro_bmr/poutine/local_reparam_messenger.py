"""Local reparameterisation: sample a layer's pre-activations instead of its weights.

For a linear map :math:`b = W x` with mean-field Gaussian weights
:math:`W_{ij} \\sim \\mathcal N(\\mu_{ij}, \\sigma_{ij}^2)`, each pre-activation is
Gaussian with

.. math::

    \\mathbb E[b_i] = \\textstyle\\sum_j \\mu_{ij} x_j, \\qquad
    \\operatorname{Var}[b_i] = \\textstyle\\sum_j \\sigma_{ij}^2 x_j^2,

so :math:`b = \\mu x + \\sqrt{\\sigma^2 x^2}\\,\\varepsilon`,
:math:`\\varepsilon \\sim \\mathcal N(0, I)`, has the distribution of :math:`Wx` for
each example, with an independent weight draw per example (Kingma, Salimans &
Welling 2015); a convolution is a linear map too. The expected log-likelihood of
the ELBO is unchanged and its gradient has lower variance. Since the network then
never reads a weight sample, none is drawn: each such weight site contributes its
KL divergence in closed form,

.. math::

    -\\mathrm{KL}(q\\,\\|\\,p) = -\\textstyle\\sum_i \\Bigl[\\ln\\frac{s_i}{\\sigma_i}
      + \\frac{\\sigma_i^2 + (\\mu_i - m_i)^2}{2 s_i^2} - \\frac12\\Bigr]

for :math:`p = \\mathcal N(m, s^2)`, summed over kept elements (a pruned element is
a point mass at zero in both guide and prior and contributes nothing).
"""

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution, constraints
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message, effectful

from pyro_bmr._gaussian_kl import kl_elementwise, kl_sum, mask_and_count, shared_masks
from pyro_bmr._tensors import compact
from pyro_bmr.distributions import PrunedNormal
from pyro_bmr.sites import innermost_normal

__all__ = [
    "LOCAL_REPARAMETERIZATION",
    "LocalReparameterizationMessenger",
    "local_reparameterization",
]

#: ``infer`` key with which a guide marks the sample sites it lets the handler
#: reparameterise locally (``MeanFieldGuide`` marks all of its sites).
LOCAL_REPARAMETERIZATION = "local_reparameterization"

#: The ``torch.nn.functional`` layers whose calls the handler sees, as messages of
#: type :data:`LAYER_MESSAGE` while it is active.
LAYER_FUNCTIONS = ("linear", "conv1d", "conv2d", "conv3d")
LAYER_MESSAGE = "affine_layer"
_ARGUMENTS = ("input", "weight", "bias")


def _elementwise_normal(fn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """``(loc, scale, keep)`` of an elementwise Normal over its full shape (``keep``
    is ``None`` when nothing is pruned), looking through ``.to_event`` and ``.expand``."""
    found = innermost_normal(fn)
    if found is None:
        return None
    base, _ = found
    shape = fn.batch_shape + fn.event_shape
    keep = base.keep.expand(shape) if isinstance(base, PrunedNormal) else None
    return base.loc.expand(shape), base.scale.expand(shape), keep


def _kl_scalar_prior(
    draw: "_Draw", m: torch.Tensor, s: torch.Tensor, keep: torch.Tensor | None
) -> torch.Tensor:
    """KL summed over the kept elements for a prior with one loc and one scale,
    reusing the draw's masked variance and float mask."""
    if keep is None:
        return kl_sum(draw.loc, draw.scale, draw.raw_var(), m, s)
    if keep is draw.keep:
        mask, n = draw.float_mask()
        return kl_sum(draw.loc, draw.scale, draw.var(), m, s, mask, n)
    mask, n = mask_and_count(keep, draw.loc.dtype)
    return kl_sum(draw.loc, draw.scale, draw.raw_var() * mask, m, s, mask, n)


class _Draw:
    """The latest draw of one guide site: its value and Gaussian posterior, and how
    the model's layers used it."""

    __slots__ = (
        "name",
        "value",
        "loc",
        "scale",
        "keep",
        "analytic",
        "uses",
        "as_bias",
        "partner",
        "prior_ok",
        "_raw_var",
        "_var",
        "_mask",
    )

    def __init__(self, name, loc, scale, keep, analytic: bool, mask=None) -> None:
        self.name, self.loc, self.scale, self.keep, self.analytic = name, loc, scale, keep, analytic
        self._mask = mask  # keep as (0/1 float mask, number kept), made on first use
        self.value: torch.Tensor | None = None
        self.uses = 0  # calls of a patched layer function that received the value
        self.as_bias = False
        self.partner: _Draw | None = None  # for a bias: the weight of its call
        self.prior_ok = False  # the model's prior at the site is an elementwise Normal
        self._raw_var: torch.Tensor | None = None
        self._var: torch.Tensor | None = None

    def float_mask(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._mask is None:
            self._mask = mask_and_count(self.keep, self.loc.dtype)
        return self._mask

    def mean(self) -> torch.Tensor:
        """The posterior mean, zero at pruned elements."""
        if self.keep is None:
            return self.loc
        return self.loc * self.float_mask()[0]

    def raw_var(self) -> torch.Tensor:
        """The posterior variance, pruned elements included."""
        if self._raw_var is None:
            self._raw_var = self.scale.square()
        return self._raw_var

    def var(self) -> torch.Tensor:
        """The posterior variance, zero at pruned elements."""
        if self._var is None:
            var = self.raw_var()
            self._var = var if self.keep is None else var * self.float_mask()[0]
        return self._var


class _PosteriorMean(TorchDistribution):
    """Guide-side stand-in for a locally reparameterised site: its draw is the
    (masked) posterior mean, which no layer reads, and its log density is zero; the
    KL is carried by :class:`_NegativeKL` on the model side."""

    has_rsample = True

    def __init__(self, base, value: torch.Tensor) -> None:
        self._value = value
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        if sample_shape:
            raise NotImplementedError("a locally reparameterised site draws one value")
        return self._value

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return value.new_zeros(self.batch_shape)


class _NegativeKL(TorchDistribution):
    """Model-side stand-in for the prior of a locally reparameterised site: its log
    density at the guide's stand-in value is :math:`-\\mathrm{KL}(q\\|p)`, summed over
    the event dimensions, so that ``log p - log q`` in any ELBO is the exact KL."""

    has_rsample = True

    def __init__(self, prior, draw: _Draw) -> None:
        params = _elementwise_normal(prior)
        if params is None:  # checked before the draw was made analytic
            raise ValueError(f"site {draw.name!r}: the prior is not an elementwise Normal")
        self._prior, self._draw = params, draw
        super().__init__(prior.batch_shape, prior.event_shape, validate_args=False)

    @property
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        draw = self._draw
        if draw.uses != 1:
            raise RuntimeError(
                f"site {draw.name!r} fed {draw.uses} linear/convolution calls in this model "
                "run; local reparameterisation needs each weight to feed exactly one"
            )
        m, s, keep_p = self._prior
        m, s = compact(m), compact(s)
        keep, mixed = shared_masks(draw.keep, keep_p)
        if m.numel() == 1 and s.numel() == 1 and not self.batch_shape:
            kl = _kl_scalar_prior(draw, m, s, keep)
            if mixed is not None:
                kl = torch.where(mixed.any(), torch.full_like(kl, float("inf")), kl)
            return -kl
        kl = kl_elementwise(draw.loc, draw.scale, m, s, keep, mixed)
        event_dims = tuple(range(-len(self.event_shape), 0))
        return -(kl.sum(event_dims) if event_dims else kl)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        raise NotImplementedError("the model-side stand-in is only scored, never sampled")


class LocalReparameterizationMessenger(Messenger):
    """Computes linear and convolution layers from the Gaussian posterior of their
    weights and adds the weights' KL in closed form, instead of drawing the weights.

    Applies to the sample sites a guide marks with
    ``infer={"local_reparameterization": True}`` (:class:`~pyro_bmr.MeanFieldGuide`
    marks all of its sites) whose guide distribution is an elementwise Normal or a
    :class:`~pyro_bmr.PrunedNormal`. The first time it sees such a site it lets the
    site be drawn as usual and records what the model does with the value; from
    then on, if the value fed exactly one call of ``torch.nn.functional.linear`` or
    ``conv1d/2d/3d`` (as weight, or as bias with such a weight) and the model's
    prior there is an elementwise Normal:

    * the guide site takes the posterior mean as a stand-in value with log density
      0, and the model site scores it with :math:`-\\mathrm{KL}(q\\|p)`, so any
      ELBO gets the exact KL term (no weight noise is drawn);
    * the layer returns :math:`f(x, \\mu) + \\sqrt{f(x^2, \\sigma^2)}\\,\\varepsilon`
      with fresh :math:`\\varepsilon \\sim \\mathcal N(0, I)`, where :math:`\\mu` and
      :math:`\\sigma^2` (and a bias's mean and variance) are zero at pruned
      elements: a pruned weight adds no mean and no variance.

    Other sites and calls are left alone. See :mod:`pyro_bmr.poutine.local_reparam_messenger`.

    .. code-block:: python

        guide = MeanFieldGuide(model)
        svi = SVI(bmr(model), bmr(guide), Adam({"lr": 1e-3}), Trace_ELBO())
        with local_reparameterization():
            for epoch in range(num_epochs):
                for x, y in loader:
                    svi.step(x, y)

    Use it around inference (outside the ELBO's own handlers), as a context
    manager or by wrapping the function that runs inference (see
    :func:`local_reparameterization`), and keep one instance for the whole loop:
    what it learns in the first step is kept by the instance. The layers reach it
    as Pyro messages of type ``"affine_layer"``: while it is active, the functions
    of :data:`LAYER_FUNCTIONS` in ``torch.nn.functional`` are made effectful
    (``pyro.poutine.runtime.effectful``), so it is not thread-safe. Inside it, traces show the posterior mean
    at the affected weight sites; run :class:`~pyro.infer.Predictive` outside it
    to draw weights. A weight that feeds no layer or several in a later run is an
    error when its KL is scored; a weight that, besides its layer, also enters
    other computations of the model (a penalty, tied weights) is not detected and
    must not be used with the handler.
    """

    def __init__(self) -> None:
        super().__init__()
        self._analytic: set[str] = set()
        self._draws: dict[int, _Draw] = {}
        self._latest: dict[str, _Draw] = {}
        self._fresh: dict[str, _Draw] = {}
        self._saved: dict[str, Callable] = {}
        # BMR hands every step the same mask tensors: convert each to floats once.
        self._masks: dict[tuple, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}

    def __enter__(self) -> "LocalReparameterizationMessenger":
        # While the handler is active, the layer functions of torch.nn.functional are
        # effectful: each call is a Pyro message that reaches this handler last.
        self._saved = {name: getattr(F, name) for name in LAYER_FUNCTIONS}
        for name, fn in self._saved.items():
            setattr(F, name, functools.update_wrapper(effectful(fn, type=LAYER_MESSAGE), fn))
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(F, name, fn)
        self._saved = {}
        self._fresh.clear()
        return super().__exit__(*exc)

    # -- sample sites ---------------------------------------------------------------

    def _pyro_sample(self, msg: Message) -> None:
        # The context is entered before inference starts, so this runs after every
        # other handler: msg["fn"] is final, and a value already set was replayed.
        if msg["is_observed"]:
            return
        value = msg["value"]
        if value is not None:
            draw = self._lookup(value)
            if draw is None:
                return
            if draw.analytic:
                msg["fn"] = _NegativeKL(msg["fn"], draw)
            else:
                draw.prior_ok = _elementwise_normal(msg["fn"]) is not None
            return
        if not msg["infer"].get(LOCAL_REPARAMETERIZATION):
            return
        params = _elementwise_normal(msg["fn"])
        if params is None:
            return
        name = msg["name"]
        self._settle(name)
        draw = _Draw(name, *params, analytic=name in self._analytic)
        if draw.analytic and draw.keep is not None:
            draw._mask = self._cached_mask(draw.keep, draw.loc.dtype)
        if draw.analytic:
            draw.value = draw.mean()
            msg["fn"] = _PosteriorMean(msg["fn"], draw.value)
            self._register(draw)
        else:
            self._fresh[name] = draw

    def _pyro_post_sample(self, msg: Message) -> None:
        draw = self._fresh.pop(msg["name"], None)
        if draw is not None and isinstance(msg["value"], torch.Tensor):
            if msg["value"].shape == draw.loc.shape:
                draw.value = msg["value"]
                self._register(draw)

    def _cached_mask(self, keep: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (keep.data_ptr(), keep._version, keep.shape, keep.stride(), keep.device, dtype)
        hit = self._masks.get(key)
        if hit is None:
            if len(self._masks) >= 4 * max(len(self._latest), 1):
                self._masks.clear()
            # The entry holds ``keep``, so its memory cannot be reused by another mask.
            hit = self._masks[key] = (keep, mask_and_count(keep, dtype))
        return hit[1]

    def _register(self, draw: _Draw) -> None:
        # An entry keeps its value alive, so the id cannot be reused while listed.
        self._draws[id(draw.value)] = draw
        self._latest[draw.name] = draw

    def _settle(self, name: str) -> None:
        """Before a site's next draw: learn from how its previous draw was used."""
        old = self._latest.pop(name, None)
        if old is None:
            return
        self._draws.pop(id(old.value), None)
        if old.analytic:
            return
        single = old.uses == 1 and old.prior_ok
        if old.as_bias:  # a bias goes local only together with its layer's weight
            weight = old.partner
            single = single and weight is not None and weight.uses == 1 and weight.prior_ok
        if single:
            self._analytic.add(name)

    def _lookup(self, tensor: torch.Tensor | None) -> _Draw | None:
        if tensor is None:
            return None
        draw = self._draws.get(id(tensor))
        return draw if draw is not None and draw.value is tensor else None

    # -- layers ---------------------------------------------------------------------

    def _pyro_affine_layer(self, msg: Message) -> None:
        if msg["done"] or msg["value"] is not None:
            return
        args, kwargs = list(msg["args"]), dict(msg["kwargs"])
        x, weight, bias = (args.pop(0) if args else kwargs.pop(name, None) for name in _ARGUMENTS)
        msg["value"] = self._affine(msg["fn"], x, weight, bias, *args, **kwargs)
        msg["done"] = True

    def _affine(self, fn: Callable, x: torch.Tensor, weight, bias, *args, **kwargs) -> torch.Tensor:
        w, b = self._lookup(weight), self._lookup(bias)
        if w is not None:
            w.uses += 1
        if b is not None:
            b.uses += 1
            b.as_bias, b.partner = True, w
        if w is None or not w.analytic:
            if b is not None and b.analytic:
                raise RuntimeError(
                    f"site {b.name!r} is reparameterised locally but its layer's weight "
                    "is not; the model's use of its sites changed between runs"
                )
            return fn(x, weight, bias, *args, **kwargs)
        analytic_bias = b is not None and b.analytic
        mean = fn(x, w.value, b.value if analytic_bias else bias, *args, **kwargs)
        var = fn(x.square(), w.var(), b.var() if analytic_bias else None, *args, **kwargs)
        # Clamping keeps the gradient of sqrt finite where the variance is zero
        # (every weight of a unit pruned, or all its inputs zero).
        std = var.clamp_min(torch.finfo(var.dtype).tiny).sqrt()
        return torch.addcmul(mean, std, torch.randn_like(mean))


def local_reparameterization(
    fn: Callable | None = None,
) -> LocalReparameterizationMessenger | Callable:
    """Functional form of :class:`LocalReparameterizationMessenger`.

    ``local_reparameterization()`` is a new handler, to use as a context manager
    around inference (``with local_reparameterization(): svi.step(x, y)``);
    ``local_reparameterization(fn)`` wraps a function that runs inference, such as
    ``svi.step`` or a whole training loop. Either way it must see the guide and the
    model together, from outside the ELBO: wrapping the model or the guide alone
    leaves every layer as it is.

    :param fn: a function that runs inference, or ``None``.
    """
    messenger = LocalReparameterizationMessenger()
    return messenger if fn is None else messenger(fn)
