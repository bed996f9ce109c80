"""Export a fitted (and reduced) Bayesian network as a plain deterministic module.

:func:`export` runs the model once with every latent site at its posterior mean
(pruned elements at exactly zero), copies the network with those values as
ordinary parameters and turns every ``PyroModule[...]`` back into the ``torch.nn``
class it was converted from; a ``PyroModule`` subclass of the user's own keeps its
class and ``forward`` but samples none of its attributes any more. Units that do
nothing (neurons, convolution channels, attention heads whose weights a structured
reduction zeroed) are then removed by :func:`~pyro_bmr.unit_removal.shrink`, which
makes those layers smaller dense layers, and chains of ``Linear`` layers with
elementwise activations between them (MLPs such as LeNet-300-100) are compressed
into one :class:`LinearChain`:

* a hidden unit whose incoming weights are all zero outputs the constant
  :math:`a = \\phi(b)`; it is removed and :math:`W_{:,i}\\,a` is added to the next
  layer's bias; a unit whose outgoing weights are all zero is removed;
* a sparse layer is stored in CSR form, and computed with ``torch.sparse`` kernels
  when it is large and sparse enough for them to be faster (see
  :data:`SPARSE_DENSITY` and :data:`SPARSE_MIN_SIZE`), else with a dense copy of
  the weight that is made at the first call and not saved.
"""

import copy
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.nn import PyroModule
from pyro.poutine.util import site_is_subsample
from torch import nn
from torch.distributions import transform_to

from pyro_bmr import _pyro_compat
from pyro_bmr._caller import warn
from pyro_bmr.unit_removal import shrink

__all__ = [
    "LinearChain",
    "SPARSE_DENSITY",
    "SPARSE_MIN_SIZE",
    "SPARSE_MIN_SIZE_SINGLE",
    "export",
    "guide_means",
]

#: Layers with at most this fraction of non-zero weights use sparse kernels.
#: Measured on CPU (``benchmarks/bench_export.py``): a CSR product beats a dense one
#: for a 300x784 layer at batch 1 and 256 up to a density of 10-15%.
SPARSE_DENSITY = 0.1
#: ... and at least this many elements (for smaller layers the dense kernel wins) ...
SPARSE_MIN_SIZE = 16384
#: ... or this many for a single example, where a CSR product's fixed cost weighs more.
SPARSE_MIN_SIZE_SINGLE = 65536

_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Tanhshrink, nn.Identity, nn.Dropout,
)  # fmt: skip


def guide_means(guide: Any, *args, bmr: Any | None = None, **kwargs) -> dict[str, torch.Tensor]:
    """The guide's posterior mean of every latent site, zero where ``bmr`` pruned.

    For a site on the real line this is the Gaussian's location; for a constrained
    site the guide's median (its location pushed through the support's bijection).

    :param guide: an autoguide with a ``median`` method (``AutoNormal``,
        ``AutoDiagonalNormal``, :class:`~pyro_bmr.MeanFieldGuide`).
    :param args: the model's arguments, needed only if the guide has never run.
    :param bmr: a :class:`~pyro_bmr.BayesianModelReduction` whose masks to apply.
    :returns: site name → detached tensor.
    """
    if not callable(getattr(guide, "median", None)):
        raise TypeError(f"guide {type(guide).__name__} has no median(); use an autoguide")
    with torch.no_grad():
        means = {name: value.detach() for name, value in guide.median(*args, **kwargs).items()}
    for name, mask in (bmr.masks if bmr is not None else {}).items():
        if name not in means:
            raise ValueError(f"bmr masks site {name!r}, which the guide does not have")
        value = means[name]
        means[name] = torch.where(mask.to(value.device), value, torch.zeros_like(value))
    return means


def export(
    model: Any,
    guide: Any,
    *args,
    bmr: Any | None = None,
    module: nn.Module | None = None,
    sparse_density: float = SPARSE_DENSITY,
    compress: bool = True,
    **kwargs,
) -> nn.Module:
    """A deterministic copy of a Bayesian network with posterior-mean weights.

    The model is run once on ``*args, **kwargs`` with every latent site fixed at
    :func:`guide_means`, so weights computed from latent sites (a decentered
    prior's ``scale * z``) take the values the network would use. Those values
    become plain parameters of a copy of ``module``, whose submodules are treated
    by kind:

    * a ``torch.nn`` class converted by ``PyroModule[...]`` (or
      ``to_pyro_module_``) is turned back into that class;
    * a ``PyroModule`` subclass of your own (a class with its own ``forward``,
      such as Pyro's Bayesian-regression tutorial model) keeps its class and its
      ``forward``; every ``PyroSample`` attribute becomes a plain ``nn.Parameter``
      at its posterior mean and every ``PyroParam`` one at its constrained value,
      so the module samples none of them any more. Its ``forward`` still runs any
      Pyro statement in it: outside inference a likelihood
      ``pyro.sample("obs", ...)`` or a noise ``pyro.sample("sigma", ...)`` draws a
      value from its distribution at each call, while whatever the network
      computes from its parameters (the ``mean``, the logits it returns) is
      deterministic. Being a ``PyroModule``, it also registers its plain parameters
      in Pyro's param store when called, as every ``PyroModule`` does; that changes
      nothing it computes.

    Latent sites of the model that are not attributes of ``module`` (a noise scale
    ``sigma`` sampled in ``forward``, the prior's hyper-parameters) are not
    parameters of the copy; their posterior means are in :func:`guide_means`. Where
    ``module`` is the model, the copy is run twice on ``*args, **kwargs`` (with
    Pyro's param store and torch's random state put back afterwards), and a warning
    names the sites it samples if its output changes from one call to the next.

    The copy, in ``eval`` mode, computes what the reduced model computes with every
    weight at its posterior mean. With ``compress``, the units that a structured
    reduction pruned are removed (:func:`~pyro_bmr.unit_removal.shrink`): layers
    keep their ``torch.nn`` classes with fewer output features, channels or heads,
    and the next layers fewer inputs; then chains of linear layers in
    ``nn.Sequential`` containers are replaced by :class:`LinearChain` s without
    their dead units.

    :param model: the Pyro model (a ``PyroModule``, e.g. a
        :class:`pyro_bmr.nn.BayesianClassifier`, or a function that runs one).
    :param guide: its fitted guide (an autoguide).
    :param args: example inputs for one model call, e.g. a batch ``x``.
    :param bmr: the :class:`~pyro_bmr.BayesianModelReduction` whose masks to apply.
    :param module: the network to export, a ``PyroModule`` that ``model`` runs, whose
        random parameters are ``PyroSample`` s; default ``model.net`` where the model
        has one (as :class:`pyro_bmr.nn.BayesianModule` does), else ``model``.
    :param float sparse_density: layers of a chain with at most this fraction of
        non-zero weights (and at least :data:`SPARSE_MIN_SIZE` elements, or
        :data:`SPARSE_MIN_SIZE_SINGLE` for one example) use ``torch.sparse`` CSR
        kernels; 0 never does.
    :param bool compress: remove dead units and compress linear chains (default);
        without it the copy has the network's exact structure and sizes.
    :returns: a ``torch.nn.Module`` on the guide's device: a plain one, or your own
        ``PyroModule`` class with plain parameters.
    :raises TypeError: if ``module`` is not a ``PyroModule``, or contains a
        :class:`pyro_bmr.nn.BayesianModule` (export the network inside it) or a
        discrete ``PyroSample``; the message names the submodule.
    :raises ValueError: if a ``PyroSample`` attribute of ``module`` has no site in
        the model's trace (the model did not use it on these arguments).
    """
    if module is None:
        net = getattr(model, "net", None)
        module = net if isinstance(net, nn.Module) else model
    if not isinstance(module, PyroModule):
        raise TypeError(
            f"module must be a PyroModule, got {type(module).__name__}: pass the "
            "PyroModule the model runs whose parameters are PyroSample s (module=...)"
        )
    if not 0.0 <= sparse_density <= 1.0:
        raise ValueError(f"sparse_density must be in [0, 1], got {sparse_density!r}")
    _check_exportable(module)
    means = guide_means(guide, *args, bmr=bmr, **kwargs)
    with torch.no_grad():
        trace = poutine.trace(poutine.condition(model, data=means)).get_trace(*args, **kwargs)
    plain = _plain_copy(module, trace)
    if compress:
        plain = _compress(shrink(plain, inplace=True).network, sparse_density)
    plain.eval()
    if module is model:
        _warn_if_random(plain, args, kwargs)
    return plain


# -- back from PyroModule to torch.nn ------------------------------------------------


def _describe(path: str, sub: nn.Module) -> str:
    if path:
        return f"submodule {path!r} ({type(sub).__name__})"
    return f"the exported module ({type(sub).__name__})"


def _check_exportable(module: PyroModule) -> None:
    from pyro_bmr.nn import BayesianModule  # pyro_bmr.nn is built on this package

    for path, sub in module.named_modules():
        if isinstance(sub, BayesianModule):
            net = f"{path}.net" if path else "net"
            raise TypeError(
                f"{_describe(path, sub)} is a pyro_bmr.nn.BayesianModule, a Bayesian "
                f"wrapper of a network: export the network inside it, its submodule "
                f"{net!r} (module=model.net is the default for such a model)"
            )


def _random_value(trace, path: str, sub: PyroModule, attr: str) -> torch.Tensor:
    where = f"{_describe(path, sub)}, PyroSample attribute {attr!r}"
    if not _pyro_compat.has_run(sub):
        raise ValueError(
            f"{where}: the module did not run when the model ran on these arguments, "
            "so it has no sample site; export a module the model runs (module=...)"
        )
    site = _pyro_compat.random_site_name(sub, attr)
    node = trace.nodes.get(site)
    if node is None or node["type"] != "sample":
        raise ValueError(
            f"{where}: its sample site {site!r} is not in the model's trace on these "
            "arguments; pass arguments under which the model uses it, or export a "
            "module without it"
        )
    value = node["value"].detach()
    if not torch.is_floating_point(value):
        raise TypeError(
            f"{where}: site {site!r} is discrete ({value.dtype}) and cannot be a "
            "parameter of a deterministic network; replace it by a fixed tensor "
            "(e.g. a buffer) before exporting"
        )
    return value


def _plain_copy(module: PyroModule, trace) -> nn.Module:
    values = {}
    for path, sub in module.named_modules():
        if isinstance(sub, PyroModule):
            for attr in _pyro_compat.random_attributes(sub):
                values[path, attr] = _random_value(trace, path, sub, attr)
    plain = copy.deepcopy(module)
    # PyroModule[cls] copies its instances as PyroModule[cls] (its __reduce__), which
    # would lose a user's subclass of it and that subclass's forward: put them back
    pairs = zip(module.modules(), plain.modules(), strict=True)
    for sub, sub_copy in pairs:
        if type(sub_copy) is not type(sub):
            sub_copy.__class__ = type(sub)
    for path, sub in list(plain.named_modules()):
        if not isinstance(sub, PyroModule):
            continue
        params = {
            attr: transform_to(constraint)(_pyro_compat.unconstrained_parameter(sub, attr)).detach()
            for attr, constraint in _pyro_compat.param_attributes(sub).items()
        }
        for attr in _pyro_compat.random_attributes(sub):
            params[attr] = values[path, attr]
        cls = _pyro_compat.converted_from(type(sub))
        if cls is None:  # a PyroModule class of the user's own: keep it and its forward
            _pyro_compat.make_deterministic_(sub, params)
        else:
            _pyro_compat.to_torch_module_(sub, cls, params)
    return plain


def _warn_if_random(plain: nn.Module, args: tuple, kwargs: dict) -> None:
    """Warn if two calls of the export on the example arguments differ."""
    devices = sorted({t.device.index or 0 for t in plain.state_dict().values() if t.is_cuda})
    with (
        torch.no_grad(),
        torch.random.fork_rng(devices=devices),
        pyro.get_param_store().scope(),
        poutine.block(),
    ):
        run = poutine.trace(plain).get_trace(*args, **kwargs)
        first, second = run.nodes["_RETURN"]["value"], plain(*args, **kwargs)
    if _same(first, second):
        return
    sampled = [
        name
        for name, node in run.nodes.items()
        if node["type"] == "sample" and not node["is_observed"] and not site_is_subsample(node)
    ]
    warn(
        f"the exported {type(plain).__name__} returns a different value at each call "
        f"on these arguments: its forward samples {sampled} (outside inference, from "
        "their distributions); return the network's output from forward, or call it "
        "under pyro.poutine.condition to fix those sites",
    )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(
            torch.equal(a, b) or torch.allclose(a, b, equal_nan=True)
        )
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return True  # not tensors: nothing to compare


# -- compression of linear chains ----------------------------------------------------


def _compress(module: nn.Module, sparse_density: float) -> nn.Module:
    # Only a Sequential that runs its children in order can have them replaced.
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        return _compress_sequential(module, sparse_density)
    for name, child in list(module.named_children()):
        new = _compress(child, sparse_density)
        if new is not child:
            setattr(module, name, new)
    return module


def _compress_sequential(seq: nn.Sequential, sparse_density: float) -> nn.Module:
    items = [_compress(child, sparse_density) for child in seq]
    out: list[nn.Module] = []
    i = 0
    while i < len(items):
        start = i
        flatten = isinstance(items[i], nn.Flatten) and (items[i].start_dim, items[i].end_dim) == (
            1,
            -1,
        )
        j = i + 1 if flatten else i
        layers: list[tuple[nn.Linear, list[nn.Module]]] = []
        while j < len(items) and type(items[j]) is nn.Linear:
            k = j + 1
            while k < len(items) and type(items[k]) in _ELEMENTWISE:
                k += 1
            layers.append((items[j], items[j + 1 : k]))
            j = k
        if layers:
            out.append(
                LinearChain.from_layers(layers, flatten=flatten, sparse_density=sparse_density)
            )
            i = j
        else:
            out.append(items[start])
            i = start + 1
    if len(out) == 1 and isinstance(out[0], LinearChain):
        return out[0]
    new = copy.copy(seq)
    new._modules = {str(n): m for n, m in enumerate(out)}
    return new


def _prune_units(
    weights: list[torch.Tensor], biases: list[torch.Tensor], acts: list[list[nn.Module]]
) -> None:
    """Remove dead and unused hidden units in place (see the module docstring)."""
    changed = True
    while changed:
        changed = False
        for k in range(len(weights) - 1):
            w, w_next = weights[k], weights[k + 1]
            dead = (w == 0).all(dim=1)
            unused = (w_next == 0).all(dim=0)
            drop = dead | unused
            if not drop.any():
                continue
            fold = dead & ~unused
            if fold.any():
                const = biases[k][fold].unsqueeze(0)
                for act in acts[k]:
                    const = act(const)
                biases[k + 1] = biases[k + 1] + w_next[:, fold] @ const.squeeze(0)
            keep = ~drop
            weights[k], biases[k] = w[keep], biases[k][keep]
            weights[k + 1] = w_next[:, keep]
            changed = True


class LinearChain(nn.Module):
    """Linear layers with elementwise activations between them, for inference.

    Layer ``k`` computes ``h @ W_k.T + b_k`` followed by its activations. A sparse
    layer keeps its weight as CSR buffers ``layers.<k>.values``, ``.col_indices`` and
    ``.crow_indices`` (int32), a dense one as ``layers.<k>.weight``. Build it with
    :meth:`from_layers`; the weights are buffers, so the chain is an inference
    artefact, not a trainable module. The kernels' operands are prepared at the
    first call and again after ``.to(...)`` or ``load_state_dict``; call
    ``_apply(lambda t: t)`` after editing a buffer in place.
    """

    def __init__(self, layers: Sequence["_ChainLayer"], flatten: bool = False) -> None:
        super().__init__()
        self.flatten = flatten
        self.layers = nn.ModuleList(layers)
        self._plan: tuple[list, list] | None = None

    @classmethod
    def from_layers(
        cls,
        layers: Sequence[tuple[nn.Linear, Sequence[nn.Module]]],
        flatten: bool = False,
        sparse_density: float = SPARSE_DENSITY,
    ) -> "LinearChain":
        """Compress ``[(linear, activations after it), ...]``.

        :param layers: consecutive ``nn.Linear`` layers, each with the elementwise
            activation modules that follow it.
        :param bool flatten: the chain starts with ``nn.Flatten()``.
        :param float sparse_density: see :func:`export`.
        """
        with torch.no_grad():
            weights = [lin.weight.detach().clone() for lin, _ in layers]
            biases = [
                lin.bias.detach().clone()
                if lin.bias is not None
                else lin.weight.new_zeros(lin.out_features)
                for lin, _ in layers
            ]
            acts = [list(a) for _, a in layers]
            _prune_units(weights, biases, acts)
        chain = [_ChainLayer(w, b, a, sparse_density) for w, b, a in zip(weights, biases, acts)]
        return cls(chain, flatten)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._plan is None:
            self._make_plan()
        if x.shape[0] == 1 and (self.flatten or x.dim() == 2):
            # one example: matrix-vector products, and as few other calls as possible
            h = x.reshape(-1)
            for weight, bias, relu, acts in self._plan[0]:
                h = torch.addmv(bias, weight, h)
                if relu:
                    h = h.relu_()
                elif acts:
                    h = _apply_all(acts, h)
            return h.unsqueeze(0)
        if self.flatten:
            x = x.flatten(1)
        lead = x.shape[:-1]
        h = x.reshape(-1, x.shape[-1])
        for weight, weight_t, bias, bias_col, relu, acts in self._plan[1]:
            if weight_t is None:  # CSR: (W h^T)^T
                h = torch.addmm(bias_col, weight, h.t()).t()
            else:
                h = torch.addmm(bias, h, weight_t)
            if relu:
                h = h.relu_()
            elif acts:
                h = _apply_all(acts, h)
        return h.reshape(*lead, -1)

    def _make_plan(self) -> None:
        # The kernels' operands, built once: the forward pass then costs little more
        # than its products. Moving or loading the chain rebuilds them.
        single, batch = [], []
        for layer in self.layers:
            sparse, dense = layer.kernel_weights()
            acts = list(layer.acts)
            single.append((sparse if layer.sparse_single else dense, layer.bias, layer.relu, acts))
            if layer.sparse_batch:
                batch.append((sparse, None, layer.bias, layer.bias.unsqueeze(1), layer.relu, acts))
            else:
                batch.append((dense, dense.t(), layer.bias, None, layer.relu, acts))
        self._plan = (single, batch)

    def _apply(self, fn, recurse=True):
        self._plan = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._plan = None
        return super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_plan"] = None
        return state


def _apply_all(acts: Sequence[nn.Module], h: torch.Tensor) -> torch.Tensor:
    for act in acts:
        h = act(h)
    return h


class _ChainLayer(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, acts, sparse_density) -> None:
        super().__init__()
        numel = weight.numel()
        nnz = int((weight != 0).sum())
        self.shape = tuple(weight.shape)
        sparse = nnz <= sparse_density * numel
        self.sparse_single = sparse and numel >= SPARSE_MIN_SIZE_SINGLE
        self.sparse_batch = sparse and numel >= SPARSE_MIN_SIZE
        # CSR costs 8 bytes per non-zero (value and int32 column) plus the row pointers
        sparse_storage = self.sparse_batch or 8 * nnz + 4 * (self.shape[0] + 1) < 4 * numel
        if sparse_storage and self.shape[0] * self.shape[1] > 0:
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support")
                csr = weight.to_sparse_csr()
            self.register_buffer("values", csr.values().contiguous())
            self.register_buffer("col_indices", csr.col_indices().to(torch.int32))
            self.register_buffer("crow_indices", csr.crow_indices().to(torch.int32))
        else:
            self.register_buffer("weight", weight.contiguous())
        self.register_buffer("bias", bias.contiguous())
        self.relu = len(acts) == 1 and type(acts[0]) is nn.ReLU
        self.acts = nn.ModuleList([] if self.relu else acts)

    def kernel_weights(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The weight in CSR form if a kernel uses it, and dense if a kernel uses it."""
        if "weight" in self._buffers:
            return None, self.weight
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support")
            csr = torch.sparse_csr_tensor(
                self.crow_indices, self.col_indices, self.values, self.shape,
                check_invariants=False,
            )  # fmt: skip
        dense = None if self.sparse_single and self.sparse_batch else csr.to_dense()
        return csr, dense

    def extra_repr(self) -> str:
        kinds = ["sparse" if flag else "dense" for flag in (self.sparse_single, self.sparse_batch)]
        return (
            f"in_features={self.shape[1]}, out_features={self.shape[0]}, "
            f"kernel={kinds[0]} (one example) / {kinds[1]} (batch)"
        )
