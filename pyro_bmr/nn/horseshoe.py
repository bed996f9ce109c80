"""Regularised horseshoe priors (Piironen & Vehtari, 2017): the *Tiered* model.

Both priors write every parameter non-centred, :math:`w = \\tilde\\lambda z` with
:math:`z \\sim \\mathcal N(0, 1)`, and shrink it through a hierarchy of scales:

* :class:`HorseshoePrior` -- one network-wide global scale
  :math:`\\tau \\sim \\mathcal C^+(0, \\tau_0)` and slab, a half-Cauchy scale per
  row of every layer, and a scale per weight on the first layer;
* :class:`LayerHorseshoePrior` -- the "reduced" form of the authors' code
  (``SVIRegression.hyperprior`` of ``dimarkov/bmr4pml``): a global scale and a slab
  per layer, a scale per row, no scale per weight, each half-Cauchy written as the
  square root of a ratio of two :math:`\\mathrm{Gamma}(\\tfrac12, 1)` variables.
"""

import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroSample

from .priors import ANCHOR, Prior, _Gamma, _rows, _set_sample

__all__ = ["HorseshoePrior", "LayerHorseshoePrior"]


class _HalfCauchy:
    def __init__(self, shape: tuple[int, ...], scale: float) -> None:
        self.shape = shape
        self.scale = scale

    def __call__(self, module: PyroModule) -> dist.TorchDistribution:
        zero = getattr(module, ANCHOR)
        return dist.HalfCauchy(zero + self.scale).expand(self.shape).to_event(len(self.shape))


class _InverseGamma:
    def __init__(self, concentration: float, rate: float) -> None:
        self.concentration = concentration
        self.rate = rate

    def __call__(self, module: PyroModule) -> dist.TorchDistribution:
        zero = getattr(module, ANCHOR)
        return dist.InverseGamma(zero + self.concentration, zero + self.rate)


class _HorseshoeNormal:
    """:math:`\\mathcal N(0, \\tilde\\lambda^2)` with the regularised horseshoe scale."""

    def __init__(
        self,
        shape: torch.Size,
        root: PyroModule,
        row: str,
        row_shape: tuple[int, ...],
        local: str | None,
    ) -> None:
        self.shape = shape
        self.root = root
        self.row = row
        self.row_shape = row_shape
        self.local = local

    def __call__(self, module: PyroModule) -> dist.TorchDistribution:
        zero = getattr(module, ANCHOR)
        tau = getattr(self.root, HorseshoePrior.global_site)
        slab = getattr(self.root, HorseshoePrior.slab_site)
        lam = getattr(module, self.row).reshape(self.row_shape)
        if self.local is not None:
            lam = lam * getattr(module, self.local)
        tau_lam_sq = (tau * lam).square()
        scale = (slab * tau_lam_sq / (slab + tau_lam_sq)).sqrt()
        return dist.Normal(zero, scale).expand(self.shape).to_event(len(self.shape))


class HorseshoePrior(Prior):
    """Regularised horseshoe (Piironen & Vehtari, 2017), non-centred.

    With a global scale :math:`\\tau \\sim \\mathcal C^+(0, \\tau_0)` (site
    ``horseshoe_global_scale``), a slab variance
    :math:`c^2 \\sim \\mathrm{InvGamma}(2, 6)` (site ``horseshoe_slab_variance``),
    per layer and parameter a local scale per row (output unit or filter)
    :math:`\\lambda_i \\sim \\mathcal C^+(0, 1)` (site ``<layer>.<param>_row_scale``;
    a bias shares its weight's row scales) and, on the first layer with a weight
    matrix, also a local scale per weight :math:`\\lambda_{ij} \\sim \\mathcal C^+(0, 1)`
    (site ``<layer>.weight_local_scale``, multiplied into :math:`\\lambda`), each
    element is

    .. math::

        w = \\tilde\\lambda z, \\quad z \\sim \\mathcal N(0, 1), \\quad
        \\tilde\\lambda^2 = \\frac{c^2 \\tau^2 \\lambda^2}{c^2 + \\tau^2 \\lambda^2}.

    The parameter sites are decentered (:attr:`decentered` is ``True``).

    :param float global_scale: :math:`\\tau_0`, the scale of the half-Cauchy
        prior on the global scale.
    :param float slab_concentration: shape of the inverse-Gamma slab prior.
    :param float slab_rate: rate of the inverse-Gamma slab prior.
    """

    decentered = True
    global_site = "horseshoe_global_scale"
    slab_site = "horseshoe_slab_variance"

    def __init__(
        self, global_scale: float = 1.0, slab_concentration: float = 2.0, slab_rate: float = 6.0
    ) -> None:
        for name, value in [
            ("global_scale", global_scale),
            ("slab_concentration", slab_concentration),
            ("slab_rate", slab_rate),
        ]:
            if not value > 0:
                raise ValueError(f"HorseshoePrior {name} must be positive, got {value!r}")
        self.global_scale = float(global_scale)
        self.slab_concentration = float(slab_concentration)
        self.slab_rate = float(slab_rate)

    def _init_slab(self) -> float:
        # The prior mean where it exists, else the mode.
        a, b = self.slab_concentration, self.slab_rate
        return b / (a - 1) if a > 1 else b / (a + 1)

    def setup_(self, root):
        _set_sample(root, self.global_site, _HalfCauchy((), self.global_scale))
        _set_sample(root, self.slab_site, _InverseGamma(self.slab_concentration, self.slab_rate))
        return {self.global_site: self.global_scale, self.slab_site: self._init_slab()}

    def apply_(self, module, params, *, root, first, last):
        inits = {}
        weight = params.get("weight")
        for name, param in params.items():
            rows, row_shape = _rows(param)
            shares_weight_rows = name == "bias" and weight is not None and _rows(weight)[0] == rows
            row = "weight_row_scale" if shares_weight_rows else f"{name}_row_scale"
            if row not in inits:
                _set_sample(module, row, _HalfCauchy(rows, 1.0))
                inits[row] = 1.0
            local = None
            if first and name == "weight":
                local = "weight_local_scale"
                _set_sample(module, local, _HalfCauchy(tuple(param.shape), 1.0))
                inits[local] = 1.0
            setattr(
                module,
                name,
                PyroSample(_HorseshoeNormal(param.shape, root, row, row_shape, local)),
            )
        return inits

    def __repr__(self) -> str:
        return (
            f"HorseshoePrior(global_scale={self.global_scale}, "
            f"slab_concentration={self.slab_concentration}, slab_rate={self.slab_rate})"
        )


class _HalfGamma:
    """:math:`\\mathrm{Gamma}(\\tfrac12, 1)` variables of a fixed shape; the square
    root of the ratio of two independent ones is :math:`\\mathcal C^+(0, 1)`."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def __call__(self, module: PyroModule) -> dist.TorchDistribution:
        zero = getattr(module, ANCHOR)
        return dist.Gamma(zero + 0.5, zero + 1.0).expand(self.shape).to_event(len(self.shape))


class _LayerHorseshoeNormal:
    """:math:`\\mathcal N(0, \\gamma^2)` with the authors' reduced horseshoe scale
    :math:`\\gamma` (the output layer's: one half-Cauchy scale)."""

    def __init__(
        self,
        shape: torch.Size,
        row_shape: tuple[int, ...],
        row: str | None,
        global_scale: float,
        has_global: bool,
    ) -> None:
        self.shape = shape
        self.row_shape = row_shape
        self.row = row
        self.global_scale = global_scale
        self.has_global = has_global

    def __call__(self, module: PyroModule) -> dist.TorchDistribution:
        zero = getattr(module, ANCHOR)
        if self.row is None:
            ratio = getattr(module, LayerHorseshoePrior.global_site)
            scale = (ratio[..., 0] / ratio[..., 1]).sqrt()
        else:
            tau_sq = zero + self.global_scale**2
            if self.has_global:
                ratio = getattr(module, LayerHorseshoePrior.global_site)
                tau_sq = tau_sq * ratio[..., 0] / ratio[..., 1]
            # rows: lambda^2 = v / u; psi / xi of the authors' code is tau^2 lambda^2
            u = getattr(module, f"{self.row}_u").reshape(self.row_shape)
            v = getattr(module, f"{self.row}_v").reshape(self.row_shape)
            precision = getattr(module, LayerHorseshoePrior.slab_site)
            psi = tau_sq * v
            scale = (psi / (u + precision * psi)).sqrt()
        return dist.Normal(zero, scale).expand(self.shape).to_event(len(self.shape))


class LayerHorseshoePrior(Prior):
    """The regularised horseshoe of Marković, Friston & Kiebel (2023), per layer.

    On every layer but the output layer, with rows :math:`i` (output units or
    filters; a bias shares its weight's rows):

    .. math::

        \\tau = \\tau_0 \\sqrt{a_1 / a_2},\\quad
        \\lambda_i = \\sqrt{v_i / u_i},\\quad
        a_k, u_i, v_i \\sim \\mathrm{Gamma}(\\tfrac12, 1),\\quad
        c^{-2} \\sim \\mathrm{Gamma}(\\alpha, \\beta),\\\\
        w_{ij} = \\gamma_i z_{ij},\\quad
        \\gamma_i^2 = \\frac{\\tau^2\\lambda_i^2}{1 + c^{-2}\\tau^2\\lambda_i^2},\\quad
        z_{ij} \\sim \\mathcal N(0, 1),

    so :math:`\\tau \\sim \\mathcal C^+(0, \\tau_0)` and
    :math:`\\lambda_i \\sim \\mathcal C^+(0, 1)`, with sites
    ``<layer>.horseshoe_global`` (:math:`a`, shape ``(2,)``; absent for a layer of
    one row, whose :math:`\\tau` is :math:`\\tau_0`), ``<layer>.<row>_u`` and
    ``<layer>.<row>_v`` (``<row>`` is ``weight_row`` for a weight and its bias)
    and ``<layer>.slab_precision`` (:math:`c^{-2}`). The output layer has one
    scale :math:`\\gamma = \\sqrt{a_1/a_2} \\sim \\mathcal C^+(0, 1)` for all its
    parameters. The parameter sites are decentered (:attr:`decentered`).

    The defaults are the authors' Tiered-FF: :math:`\\tau_0 = 10^{-2}` and
    :math:`c^{-2} \\sim \\mathrm{Gamma}(2, 6)`.

    :param float global_scale: :math:`\\tau_0`.
    :param float slab_concentration: :math:`\\alpha` of the slab precision.
    :param float slab_rate: :math:`\\beta` of the slab precision.
    """

    decentered = True
    global_site = "horseshoe_global"
    slab_site = "slab_precision"

    def __init__(
        self, global_scale: float = 1e-2, slab_concentration: float = 2.0, slab_rate: float = 6.0
    ) -> None:
        for name, value in [
            ("global_scale", global_scale),
            ("slab_concentration", slab_concentration),
            ("slab_rate", slab_rate),
        ]:
            if not value > 0:
                raise ValueError(f"LayerHorseshoePrior {name} must be positive, got {value!r}")
        self.global_scale = float(global_scale)
        self.slab_concentration = float(slab_concentration)
        self.slab_rate = float(slab_rate)

    def apply_(self, module, params, *, root, first, last):
        if last:
            _set_sample(module, self.global_site, _HalfGamma((2,)))
            for name, param in params.items():
                setattr(
                    module,
                    name,
                    PyroSample(_LayerHorseshoeNormal(param.shape, (), None, 1.0, False)),
                )
            return {self.global_site: 1.0}
        inits = {self.slab_site: self.slab_concentration / self.slab_rate}
        _set_sample(module, self.slab_site, _Gamma(self.slab_concentration, self.slab_rate))
        weight = params.get("weight", next(iter(params.values())))
        has_global = _rows(weight)[0] != (1,) and weight.dim() > 0
        if has_global:
            _set_sample(module, self.global_site, _HalfGamma((2,)))
            inits[self.global_site] = 1.0
        for name, param in params.items():
            rows, row_shape = _rows(param)
            shares_weight_rows = name == "bias" and "weight" in params and _rows(weight)[0] == rows
            row = "weight_row" if shares_weight_rows else f"{name}_row"
            if f"{row}_u" not in inits:
                for end in ("u", "v"):
                    _set_sample(module, f"{row}_{end}", _HalfGamma(rows))
                    inits[f"{row}_{end}"] = 1.0
            setattr(
                module,
                name,
                PyroSample(
                    _LayerHorseshoeNormal(
                        param.shape, row_shape, row, self.global_scale, has_global
                    )
                ),
            )
        return inits

    def __repr__(self) -> str:
        return (
            f"LayerHorseshoePrior(global_scale={self.global_scale}, "
            f"slab_concentration={self.slab_concentration}, slab_rate={self.slab_rate})"
        )
