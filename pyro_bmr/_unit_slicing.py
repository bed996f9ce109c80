"""Removing the units of one layer exactly, given the layer that reads them.

A :class:`UnitLink` joins a *producer* (an ``nn.Linear`` whose rows, or a
convolution whose output channels, are the units) to its *consumer* (the next
``nn.Linear`` or convolution, whose input columns or channels read them) through
modules that keep the units apart (``between``: elementwise activations, dropout,
pooling, batch norm, a ``Flatten``). Unit :math:`i` may go when

* the consumer's weights reading it are all zero: nothing reads it; or
* its own weights are all zero: it outputs its bias :math:`b_i` everywhere, which
  the modules between turn into a constant :math:`c_i`. Where :math:`c_i = 0` it
  contributes nothing; else the consumer, when it sees :math:`c_i` at every input
  position it reads (a ``Linear``; a convolution without zero padding), adds
  :math:`c_i \\sum_k W_{:, i, k}` to its bias instead, the sum running over the
  kernel or over the columns of the flattened channel.

Pooling keeps a constant map constant unless it averages in padding
(``AvgPool`` with ``count_include_pad`` and padding, or a ``divisor_override``);
a unit whose value is then non-zero is kept. Constants are computed as in
``eval`` mode (batch norm with its running statistics, dropout as the identity).

A layer keeps at least one unit: where every unit may go, the first stays with all
its weights and its bias zero, and the consumer reading none of it, so it
contributes exactly nothing. Zero-width layers work in eager PyTorch on CPU, but
not in every kernel, export format or compiler; one zero unit costs little.
"""

import torch
from torch import nn

__all__ = ["BATCH_NORM", "LAYERS", "POOLING", "UnitLink", "is_elementwise", "set_tensor"]

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
POOLING = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)  # fmt: skip
BATCH_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# the identity in eval mode
EVAL_IDENTITY = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)  # fmt: skip
# the same function of every element, in training as in eval mode
_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.LogSigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Hardtanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink,
    nn.Threshold,
)  # fmt: skip


def is_elementwise(module: nn.Module) -> bool:
    """Whether ``module`` applies one function to every element (or is the identity
    in eval mode)."""
    if type(module) is nn.PReLU:
        return module.num_parameters == 1
    return type(module) in _ELEMENTWISE or type(module) in EVAL_IDENTITY


def set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer ``name`` of ``module`` by ``value``."""
    value = value.contiguous()
    if name in module._buffers:
        module._buffers[name] = value
        return
    old = getattr(module, name, None)
    if not isinstance(old, torch.Tensor):  # a new bias: trainable as the weight is
        old = getattr(module, "weight", None)
    requires_grad = old.requires_grad if isinstance(old, torch.Tensor) else True
    setattr(module, name, nn.Parameter(value, requires_grad=requires_grad))


def _keeps_constants(pool: nn.Module) -> bool:
    """Whether pooling a constant map gives the same constant everywhere."""
    if not isinstance(pool, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        return True  # max pooling pads with -inf, adaptive pooling does not pad
    if getattr(pool, "divisor_override", None) is not None:
        return False
    padding = pool.padding if isinstance(pool.padding, tuple) else (pool.padding,)
    return not pool.count_include_pad or all(p == 0 for p in padding)


def _sees_constants(consumer: nn.Module) -> bool:
    """Whether every input position the consumer reads holds a constant channel's value."""
    if isinstance(consumer, nn.Linear) or consumer.padding_mode != "zeros":
        return True  # reflecting, replicating or wrapping a constant map keeps it
    if isinstance(consumer.padding, str):
        return consumer.padding == "valid"
    return all(p == 0 for p in consumer.padding)


class UnitLink:
    """The units of ``producer`` as read by ``consumer`` (see the module's description).

    :param producer: an ``nn.Linear`` or an ``nn.Conv1d``/``2d``/``3d`` with ``groups=1``.
    :param between: the modules that run between the two, in order.
    :param consumer: the layer that reads the units, its input columns in blocks of
        equal size per unit (a flattened channel's positions) or its input channels.
    """

    def __init__(self, producer: nn.Module, between: list[nn.Module], consumer: nn.Module):
        self.producer, self.between, self.consumer = producer, between, consumer
        self._folds = _sees_constants(consumer)

    @property
    def width(self) -> int:
        """The number of units."""
        return self.producer.weight.shape[0]

    def _reads(self) -> torch.Tensor:
        """The consumer's weight as ``(outputs, units, positions read per unit)``."""
        weight = self.consumer.weight
        return weight.reshape(weight.shape[0], self.width, -1)

    def _constants(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per unit, what it outputs when its weights are zero, and whether the
        consumer sees that value at every position it reads."""
        bias = self.producer.bias
        value = bias.clone() if bias is not None else self.producer.weight.new_zeros(self.width)
        known = torch.ones_like(value, dtype=torch.bool)
        for module in self.between:
            if isinstance(module, POOLING):
                if not _keeps_constants(module):
                    known &= value == 0  # zeros pool to zeros, other constants need not
            elif isinstance(module, BATCH_NORM):
                if module.running_mean is None:
                    known[:] = False  # normalised by each batch's statistics
                    continue
                value = (value - module.running_mean) * torch.rsqrt(module.running_var + module.eps)
                if module.weight is not None:
                    value = value * module.weight + module.bias
            elif not isinstance(module, (nn.Flatten, *EVAL_IDENTITY)):
                value = module(value)  # elementwise
        return value, known

    def step(self) -> bool:
        """Remove the units that may go, folding constants into the consumer's bias.

        :returns: whether anything changed.
        """
        weight = self.producer.weight
        dead = (weight.reshape(self.width, -1) == 0).all(dim=1)
        reads = self._reads()
        unused = (reads.transpose(0, 1).reshape(self.width, -1) == 0).all(dim=1)
        value, known = self._constants()
        gone = dead & known & ((value == 0) | self._folds)
        fold = gone & ~unused & (value != 0)
        changed = bool(fold.any())
        if changed:
            self._add_to_bias(reads[:, fold].sum(dim=2) @ value[fold])
        drop = unused | gone
        if bool(drop.all()):
            changed |= self._empty_first()
            drop[0] = False
        if bool(drop.any()):
            self._keep(~drop)
            changed = True
        return changed

    def _add_to_bias(self, delta: torch.Tensor) -> None:
        bias = self.consumer.bias
        set_tensor(self.consumer, "bias", delta if bias is None else bias + delta)

    def _empty_first(self) -> bool:
        """Zero unit 0's weights, bias and readers; whether any was non-zero."""
        weight, bias, reads = self.producer.weight, self.producer.bias, self._reads()
        parts = [weight[0], reads[:, 0]] + ([] if bias is None else [bias[:1]])
        if not any(bool(part.any()) for part in parts):
            return False
        weight, reads = weight.clone(), reads.clone()
        weight[0], reads[:, 0] = 0, 0
        set_tensor(self.producer, "weight", weight)
        set_tensor(self.consumer, "weight", reads.reshape(self.consumer.weight.shape))
        if bias is not None:
            set_tensor(self.producer, "bias", torch.cat([bias.new_zeros(1), bias[1:]]))
        return True

    def _keep(self, keep: torch.Tensor) -> None:
        reads = self._reads()[:, keep]
        count = int(keep.sum())
        producer, consumer = self.producer, self.consumer
        set_tensor(producer, "weight", producer.weight[keep])
        if producer.bias is not None:
            set_tensor(producer, "bias", producer.bias[keep])
        if isinstance(producer, nn.Linear):
            producer.out_features = count
        else:
            producer.out_channels = count
        for norm in self.between:
            if isinstance(norm, BATCH_NORM):
                for name in ("weight", "bias", "running_mean", "running_var"):
                    if getattr(norm, name) is not None:
                        set_tensor(norm, name, getattr(norm, name)[keep])
                norm.num_features = count
        if isinstance(consumer, nn.Linear):
            set_tensor(consumer, "weight", reads.reshape(reads.shape[0], -1))
            consumer.in_features = consumer.weight.shape[1]
        else:
            shape = consumer.weight.shape
            set_tensor(consumer, "weight", reads.reshape(shape[0], count, *shape[2:]))
            consumer.in_channels = count
