"""Fit a regularised-horseshoe reduced prior to the posterior of a flat model.

Bayesian model reduction scores a reduced prior in closed form from the fitted
posterior of the full model. Here the reduced prior is itself uncertain: a
regularised horseshoe per layer, in the reduced form of Marković, Friston & Kiebel
(``BMRRegression.rh_model`` of ``dimarkov/bmr4pml``), whose hyper-parameters
:math:`\\theta` are fitted by stochastic variational inference to the evidence of
the reduced model, :math:`\\ln p(\\theta) + \\sum_{ij} \\Delta F_{ij}(\\gamma_i^2(\\theta))`.

**Standardised elements.** Each element is scored through its standardised value
:math:`z = (w - m)/s`, whose prior is :math:`\\mathcal N(0, 1)`, posterior
:math:`\\mathcal N(\\mu, \\sigma^2)` (:math:`\\mu = (\\mu_w - m)/s`,
:math:`\\sigma = \\sigma_w/s`) and reduced prior :math:`\\mathcal N(0, g)`,
:math:`g = \\gamma^2`. The ΔF of :mod:`pyro_bmr.free_energy` at :math:`m = \\tilde m = 0`,
:math:`s = 1`, :math:`\\tilde s^2 = g` becomes, with :math:`D = \\sigma^2 + g(1 - \\sigma^2)`,

.. math::

    \\Delta F = -\\tfrac12 \\ln D - \\frac{\\mu^2 (1 - g)}{2D},\\qquad
    \\tilde\\mu = \\frac{g\\mu}{D},\\quad \\tilde\\sigma^2 = \\frac{g\\sigma^2}{D},\\qquad
    \\frac{\\partial \\Delta F}{\\partial g} = \\frac{\\mu^2 - (1 - \\sigma^2) D}{2D^2}

(the derivative uses :math:`D + (1 - g)(1 - \\sigma^2) = 1`). :math:`D > 0` for every
:math:`g \\ge 0` when :math:`\\sigma \\le 1`. A posterior wider than its prior
(:math:`\\sigma > 1`) makes :math:`\\int q\\,\\tilde p/p` diverge for large :math:`g`,
so :math:`\\sigma` is clipped to 1: such an element carries no evidence about its
scale beyond its mean, :math:`\\Delta F = -\\mu^2(1 - g)/2`. (It is also clipped
from below, at :math:`10^{-6}` (``MIN_VAR``), which keeps every term finite in
single precision.) An element at :math:`\\mu = 0, \\sigma = 1` (the posterior is
the prior) has :math:`\\Delta F = 0` for every :math:`g`.

**Hyperprior.** Per layer :math:`l` and row :math:`i` (the first dimension; the
sites of a layer with the same number of rows share them, so a bias shares its
weight's rows, as in :class:`~pyro_bmr.nn.LayerHorseshoePrior`):

.. math::

    \\tau^2 = \\tau_0^2 \\frac{a_1}{a_2},\\quad \\lambda_i^2 = \\frac{v_i}{u_i},\\quad
    a_k, u_i, v_i \\sim \\mathrm{Gamma}(\\tfrac12, 1),\\quad
    c^{-2} \\sim \\mathrm{Gamma}(\\alpha, \\beta),\\\\
    \\gamma_i^2 = \\frac{\\tau^2\\lambda_i^2}{1 + c^{-2}\\tau^2\\lambda_i^2}
      = \\frac{\\psi_i}{u_i + c^{-2}\\psi_i},\\quad \\psi_i = \\tau^2 v_i,

so :math:`\\tau \\sim \\mathcal C^+(0, \\tau_0)` and :math:`\\lambda_i \\sim \\mathcal C^+(0, 1)`;
a layer of one row has :math:`\\tau = \\tau_0`. :math:`\\gamma^2` and
:math:`1/\\gamma^2` are computed from the logarithms of the hyper-parameters, so
that no draw, however far a fit takes it, makes them infinite or NaN, and
:math:`\\gamma^2` is at most 1 (``MAX_REDUCED_VAR``): a reduction never widens the
prior. An element whose posterior is as wide as its prior but shifted,
:math:`\\sigma = 1, \\mu \\ne 0`, has :math:`\\Delta F = \\mu^2 (g - 1)/2`, which
grows without bound in :math:`g`; after a reduction such elements are common (a
row shrunk to a prior narrower than its posterior), and uncapped, the fit drove
the slab precision to zero and widened their priors ten-thousandfold, with the
reduced posterior means (:math:`g\\mu/D`) along, which took a LeNet-300-100 on
MNIST from 97% to 52% accuracy in three reductions.

**Result.** With :math:`q(\\theta)` fitted (``AutoNormal``), each row's reduced prior
is summarised by its expected precision, the authors' choice:
:math:`\\gamma_{\\mathrm{eff}, i} = \\mathbb E_q[1/\\gamma_i^2]^{-1/2}`, with
:math:`1/\\gamma_i^2 = u_i/\\psi_i + c^{-2}`, averaged over draws from :math:`q`.
"""

import math
import warnings
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.infer.util import zero_grads
from pyro.optim import Adam
from torch.autograd.function import once_differentiable
from tqdm.auto import tqdm

__all__ = [
    "HorseshoeFit",
    "HorseshoeModel",
    "fit_horseshoe",
    "layer_of",
    "standardised_delta_f",
    "standardised_posterior",
]


def layer_of(site: str) -> str:
    """The default grouping of sites into layers: the site's name without its last
    dotted part (``net.0.weight_decentered`` → ``net.0``)."""
    return site.rsplit(".", 1)[0] if "." in site else site


#: the widest reduced prior, :math:`g = \\gamma^2 \\le 1`: a reduction never widens the
#: prior it reduces. ΔF of an element whose posterior is about as wide as its prior
#: but shifted grows without bound in :math:`g` (its likelihood is an exponential
#: tilt), and the fit would follow it with the slab precision to zero
MAX_REDUCED_VAR = 1.0
_LOG_MAX_VAR = math.log(MAX_REDUCED_VAR)

#: the smallest standardised posterior variance :math:`\\sigma^2` scored: a posterior a
#: million times narrower than its prior is a point estimate, and the bound keeps
#: :math:`1/D^2` finite in single precision
MIN_VAR = 1e-12


def _clipped_var(scale: torch.Tensor) -> torch.Tensor:
    return scale.square().clamp(min=MIN_VAR, max=1.0)


def _log(x: torch.Tensor) -> torch.Tensor:
    """:math:`\\ln x`, a draw that underflowed to 0 taken as the dtype's smallest normal."""
    return torch.log(x.clamp_min(torch.finfo(x.dtype).tiny))


def _variance(log_psi: torch.Tensor, log_u: torch.Tensor, log_c: torch.Tensor) -> torch.Tensor:
    """:math:`g = \\psi/(u + c^{-2}\\psi)` from logarithms, within
    :math:`[\\text{tiny}, g_{\\max}]` (:data:`MAX_REDUCED_VAR`)."""
    log_g = log_psi - torch.logaddexp(log_u, log_c + log_psi)
    return torch.exp(log_g.clamp(math.log(torch.finfo(log_g.dtype).tiny), _LOG_MAX_VAR))


def _precision(log_psi: torch.Tensor, log_u: torch.Tensor, log_c: torch.Tensor) -> torch.Tensor:
    """:math:`1/g = u/\\psi + c^{-2}` from logarithms, at least :math:`1/g_{\\max}`."""
    info = torch.finfo(log_u.dtype)
    ratio = torch.exp((log_u - log_psi).clamp(max=0.5 * math.log(info.max)))
    return (ratio + log_c.exp()).clamp_min(1 / MAX_REDUCED_VAR)


def standardised_delta_f(
    loc: torch.Tensor, scale: torch.Tensor, reduced_var: torch.Tensor
) -> torch.Tensor:
    """ΔF of the reduced prior :math:`\\mathcal N(0, g)` of standardised elements
    (prior :math:`\\mathcal N(0, 1)`, posterior :math:`\\mathcal N(\\mu, \\sigma^2)`,
    :math:`\\sigma` clipped to :math:`[10^{-6}, 1]`), elementwise and differentiable
    in all arguments: :math:`-\\tfrac12 \\ln D - \\mu^2(1 - g)/2D` (module docstring).

    :param torch.Tensor loc: :math:`\\mu`.
    :param torch.Tensor scale: :math:`\\sigma > 0`.
    :param torch.Tensor reduced_var: :math:`g \\ge 0`.
    """
    var = _clipped_var(scale)
    d = var + reduced_var * (1 - var)
    return -0.5 * (torch.log(d) + loc.square() * (1 - reduced_var) / d)


def standardised_posterior(
    loc: torch.Tensor, scale: torch.Tensor, reduced_var: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reduced posterior :math:`(\\tilde\\mu, \\tilde\\sigma) = (g\\mu/D,
    \\sigma\\sqrt{g/D})` of standardised elements under :math:`\\mathcal N(0, g)`
    (:math:`\\sigma` clipped as in :func:`standardised_delta_f`)."""
    var = _clipped_var(scale)
    ratio = reduced_var / (var + reduced_var * (1 - var))
    return loc * ratio, (var * ratio).sqrt()


class _RowDeltaF(torch.autograd.Function):
    """:math:`\\sum_j \\Delta F_{ij}(g_i)` for rows of standardised elements given as
    ``(μ², σ², 1 − σ²)`` of shape ``(rows, cols)`` and ``g`` of shape
    ``batch + (rows, 1)``, with the gradient in ``g`` (module docstring) summed in
    the same pass: :math:`-\\tfrac12 \\sum_j \\ln D_{ij} - \\tfrac12 (1 - g_i) \\sum_j
    \\mu_{ij}^2/D_{ij}` and :math:`\\tfrac12 \\sum_j (\\mu_{ij}^2/D_{ij}^2 - (1 -
    \\sigma_{ij}^2)/D_{ij})`. One batch element (particle) at a time, so that the
    temporaries of a layer stay in cache: several times faster on CPU than the
    composed operations over all particles and their backward."""

    @staticmethod
    def forward(ctx, g, mu_sq, var, one_minus_var):
        rows = mu_sq.shape[0]
        values, grads = [], []
        for g_p in g.reshape(-1, rows, 1):
            inv = torch.addcmul(var, g_p, one_minus_var).reciprocal_()  # 1/D
            sum_log_inv = inv.log().sum(-1)
            sum_c = (inv * mu_sq).sum(-1)
            sum_a = (inv * one_minus_var).sum(-1)
            sum_c2 = (inv.square_() * mu_sq).sum(-1)
            values.append(0.5 * (sum_log_inv - (1 - g_p.squeeze(-1)) * sum_c))
            grads.append(0.5 * (sum_c2 - sum_a))
        batch = g.shape[:-2]
        ctx.save_for_backward(torch.stack(grads).reshape(batch + (rows, 1)))
        return torch.stack(values).reshape(batch + (rows,))

    @staticmethod
    @once_differentiable
    def backward(ctx, upstream):
        (grad,) = ctx.saved_tensors
        return upstream.unsqueeze(-1) * grad, None, None, None


@dataclass
class _Rows:
    """The sites of one layer that share one scale per row, their elements as
    ``(rows, cols)`` tensors of ``μ²``, ``σ²`` and ``1 − σ²``."""

    name: str
    sites: list[str]
    mu_sq: torch.Tensor
    var: torch.Tensor
    one_minus_var: torch.Tensor

    @property
    def size(self) -> int:
        return self.mu_sq.shape[0]


@dataclass
class _Layer:
    name: str
    rows: list[_Rows]
    has_global: bool


class HorseshoeModel:
    """The Pyro model fitted by :func:`fit_horseshoe`: for every layer, the
    hyperprior sites ``<layer>.slab_precision`` (:math:`c^{-2}`),
    ``<layer>.horseshoe_global`` (:math:`a`, shape ``(2,)``; absent for a layer of
    one row) and per row group ``<site>.row_u`` and ``<site>.row_v`` (named after
    the group's first site), and a factor ``<layer>.delta_f`` of the layer's summed
    ΔF (module docstring). Calling it runs the model; it takes no arguments.

    :param posteriors: site name → ``(loc, scale)`` of the standardised posterior
        (prior :math:`\\mathcal N(0, 1)`). An element given as ``(0, 1)`` adds
        nothing to ΔF: pass pruned elements so.
    :param groups: site name → layer key; default :func:`layer_of`.
    :param float global_scale: :math:`\\tau_0`.
    :param slab: ``(α, β)`` of the Gamma prior on the slab precision :math:`c^{-2}`.
    :raises ValueError: for no sites, a site without elements, or a non-positive
        hyper-parameter.
    """

    def __init__(
        self,
        posteriors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        groups: Callable[[str], Hashable] | None = None,
        *,
        global_scale: float = 1e-2,
        slab: tuple[float, float] = (2.0, 6.0),
    ) -> None:
        check_hyperprior(global_scale, slab)
        if not posteriors:
            raise ValueError("HorseshoeModel needs at least one site")
        group_of = layer_of if groups is None else groups
        self.global_scale = float(global_scale)
        self.slab = (float(slab[0]), float(slab[1]))
        self.shapes: dict[str, torch.Size] = {}
        layers: dict[str, dict[int, list[tuple[str, torch.Tensor, torch.Tensor]]]] = {}
        for name, (loc, scale) in posteriors.items():
            if loc.numel() == 0:
                raise ValueError(f"site {name!r} has no elements")
            self.shapes[name] = loc.shape
            rows = loc.reshape(1, -1) if loc.dim() == 0 else loc.reshape(loc.shape[0], -1)
            scale = scale.expand(loc.shape).reshape(rows.shape)
            by_rows = layers.setdefault(str(group_of(name)), {})
            by_rows.setdefault(rows.shape[0], []).append((name, rows, scale))
        self._layers = []
        for layer, by_rows in layers.items():
            rows_groups = []
            for members in by_rows.values():
                names = [m[0] for m in members]
                mu = torch.cat([m[1] for m in members], dim=1)
                var = _clipped_var(torch.cat([m[2] for m in members], dim=1))
                group = _Rows(f"{names[0]}.row", names, mu.square(), var, 1 - var)
                rows_groups.append(group)
            has_global = any(group.size > 1 for group in rows_groups)
            self._layers.append(_Layer(layer, rows_groups, has_global))
        first = next(iter(posteriors.values()))[0]
        self._zero = first.new_zeros(())

    def __call__(self) -> None:
        for layer in self._layers:
            total = self._zero
            for group, log_psi, log_u, log_c in self._row_terms(layer, self._sample):
                g = _variance(log_psi, log_u, log_c)
                total = total + _RowDeltaF.apply(
                    g.unsqueeze(-1), group.mu_sq, group.var, group.one_minus_var
                ).sum(-1)
            pyro.factor(f"{layer.name}.delta_f", total)

    def _sample(self, name: str, shape: tuple[int, ...], concentration: float, rate: float):
        zero = self._zero
        fn = dist.Gamma(zero + concentration, zero + rate)
        if shape:
            fn = fn.expand(shape).to_event(len(shape))
        return pyro.sample(name, fn)

    def _row_terms(self, layer: _Layer, value: Callable) -> list[tuple]:
        """``(group, ln ψ, ln u, ln c⁻²)`` of every row group of ``layer``, each of
        shape ``batch + (rows,)``, from ``value(name, shape, α, β)`` of each
        hyperprior site (a draw, or a value looked up). In logarithms, so that
        :math:`\\gamma^2 = \\psi/(u + c^{-2}\\psi)` and :math:`1/\\gamma^2 = u/\\psi +
        c^{-2}` stay finite for any draw, however far a fit takes it."""
        log_c = _log(value(f"{layer.name}.slab_precision", (), *self.slab)).unsqueeze(-1)
        log_tau_sq = self._zero + 2 * math.log(self.global_scale)
        if layer.has_global:
            a = _log(value(f"{layer.name}.horseshoe_global", (2,), 0.5, 1.0))
            log_tau_sq = log_tau_sq + a[..., 0] - a[..., 1]
        terms = []
        for group in layer.rows:
            log_u = _log(value(f"{group.name}_u", (group.size,), 0.5, 1.0))
            log_v = _log(value(f"{group.name}_v", (group.size,), 0.5, 1.0))
            terms.append((group, log_tau_sq.unsqueeze(-1) + log_v, log_u, log_c))
        return terms

    def _per_site(self, values: Mapping[str, torch.Tensor], inverse: bool) -> dict:
        out = {}
        for layer in self._layers:
            terms = self._row_terms(layer, lambda name, *_: values[name])
            for group, log_psi, log_u, log_c in terms:
                if inverse:
                    per_row = _precision(log_psi, log_u, log_c)
                else:
                    per_row = _variance(log_psi, log_u, log_c)
                for site in group.sites:
                    out[site] = _per_site(per_row, self.shapes[site])
        return out

    def reduced_variances(self, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """:math:`\\gamma^2` of every site, broadcastable to its shape (one value per
        row), from values of the hyperprior sites with any leading sample
        dimensions (which the result keeps)."""
        return self._per_site(values, inverse=False)

    def expected_precisions(self, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """:math:`\\mathbb E[1/\\gamma^2]` of every site (one value per row,
        broadcastable to its shape), averaged over the leading dimension of
        ``values``, draws of the hyperprior sites (:math:`1/\\gamma^2 = u/\\psi + c^{-2}`)."""
        return {site: p.mean(0) for site, p in self._per_site(values, inverse=True).items()}


def _per_site(per_row: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Row values ``batch + (rows,)`` as ``batch + (rows, 1, ...)`` for a site of
    ``shape`` (``batch`` for a 0-dim site)."""
    if len(shape) == 0:
        return per_row[..., 0]
    return per_row.reshape(per_row.shape + (1,) * (len(shape) - 1))


def check_hyperprior(global_scale: float, slab: tuple[float, float]) -> None:
    """Raise :class:`ValueError` unless :math:`\\tau_0` and the slab's ``(α, β)`` are
    positive and finite, naming the option."""
    if not isinstance(global_scale, (int, float)) or not 0 < global_scale < float("inf"):
        raise ValueError(f"global_scale must be a positive number, got {global_scale!r}")
    if (
        not isinstance(slab, (tuple, list))
        or len(slab) != 2
        or not all(isinstance(x, (int, float)) and 0 < x < float("inf") for x in slab)
    ):
        raise ValueError(
            f"slab must be (concentration, rate) of the slab precision's Gamma prior, two "
            f"positive numbers, got {slab!r}"
        )


@dataclass(frozen=True)
class HorseshoeFit:
    """The result of :func:`fit_horseshoe`.

    :ivar dict scales: site name → :math:`\\gamma_{\\mathrm{eff}}`, one value per row,
        broadcastable to the site's shape.
    :ivar list losses: the ELBO loss (negative evidence bound) at every step.
    :ivar int skipped_steps: steps whose loss or gradient was not finite, and which
        therefore changed nothing.
    """

    scales: dict[str, torch.Tensor]
    losses: list[float]
    skipped_steps: int = 0


def fit_horseshoe(
    model: HorseshoeModel,
    *,
    num_steps: int = 5000,
    num_particles: int = 16,
    lr: float = 1e-2,
    num_samples: int = 1000,
    progress: bool = False,
) -> HorseshoeFit:
    """Fit the hyper-parameters of ``model`` by SVI with an ``AutoNormal`` guide
    (Adam, ``num_particles`` vectorised particles of ``Trace_ELBO``) and summarise
    each row by :math:`\\gamma_{\\mathrm{eff}} = \\mathbb E_q[1/\\gamma^2]^{-1/2}` over
    ``num_samples`` draws of the guide. The guide's parameters live in a param store
    of their own, so Pyro's global one is left as it was. A step whose loss or
    gradient is not finite (a draw far in a tail) changes nothing, as NumPyro's
    ``stable_update`` of the authors' fit.

    :param HorseshoeModel model: the model.
    :param int num_steps: SVI steps (the authors': 5000).
    :param int num_particles: particles per step (the authors': 16).
    :param float lr: Adam's learning rate.
    :param int num_samples: guide draws behind :math:`\\mathbb E_q` (the authors': 1000).
    :param bool progress: show a progress bar.
    :rtype: HorseshoeFit
    """
    check_fit_options(
        num_steps=num_steps, num_particles=num_particles, lr=lr, num_samples=num_samples
    )
    loss = Trace_ELBO(
        num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=0
    )
    losses, skipped = [], 0
    # the model is built here and valid by construction: no checks at every step
    with pyro.get_param_store().scope(), pyro.validation_enabled(False), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Encountered NaN", UserWarning)
        guide = AutoNormal(model)
        svi = SVI(model, guide, Adam({"lr": lr}), loss)
        for _ in tqdm(range(num_steps), disable=not progress, desc="horseshoe fit", unit="step"):
            value, stepped = _stable_step(svi)
            losses.append(value)
            skipped += not stepped
        with torch.no_grad(), pyro.plate("horseshoe_draws", num_samples, dim=-1):
            trace = poutine.trace(guide).get_trace()
    values = {
        name: site["value"]
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["infer"].get("is_auxiliary")
    }
    precisions = model.expected_precisions(values)
    return HorseshoeFit({site: p.rsqrt() for site, p in precisions.items()}, losses, skipped)


def _stable_step(svi: SVI) -> tuple[float, bool]:
    """:meth:`SVI.step <pyro.infer.SVI.step>` that leaves the parameters alone where
    the loss or a gradient is not finite: ``(loss, whether the step was taken)``."""
    with poutine.trace(param_only=True) as capture:
        loss = float(svi.loss_and_grads(svi.model, svi.guide))
    params = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
    finite = math.isfinite(loss) and all(
        p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params
    )
    if finite:
        svi.optim(params)
    zero_grads(params)
    return loss, finite


def check_fit_options(**options) -> None:
    """Raise :class:`ValueError` for a fit option of :func:`fit_horseshoe` out of
    range, naming it."""
    for name in ("num_steps", "num_particles", "num_samples"):
        value = options.get(name, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    lr = options.get("lr", 1.0)
    if not isinstance(lr, (int, float)) or not 0 < lr < float("inf"):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
