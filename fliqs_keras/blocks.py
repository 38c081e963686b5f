"""Searchable architecture blocks: layers whose kernel size, channels or presence a decision sets.

Single-path weight sharing, as TuNAS builds it: one weight tensor at the
largest choice, of which a choice uses a part (the centre of the largest
kernel, the first channels), selected by a mask so that the compiled step has
static shapes and one path whatever the number of choices. A layer reads its
choice from a `FormatState`, like the format wrappers: the SearchModel's, or a
private one (at its initial, by default largest, choices) when used alone.
"""

from __future__ import annotations

from typing import Any, Mapping

import keras
import numpy as np
from keras import ops

from fliqs_keras import architecture, format_state
from fliqs_keras.architecture import CostFactor, Dimension


def _numpy_dtype(dtype) -> np.dtype:
    return np.dtype(keras.backend.standardize_dtype(dtype))


class _Decides:
    """The state binding of an architecture layer: its dimensions and where their choices are read."""

    def _init_dimensions(self, dimensions: Mapping[str, Dimension | Mapping | None],
                         initial_choices: Mapping[str, str] | None):
        self.dimensions = {role: d if isinstance(d, Dimension) else Dimension.from_config(d)
                           for role, d in dimensions.items() if d is not None}
        seen: dict[str, tuple] = {}
        for dim in self.dimensions.values():
            if seen.setdefault(dim.decision, dim.choices) != dim.choices:
                raise ValueError(f"Layer {self.name!r}: decision {dim.decision!r} is given different choices.")
        largest = {d.decision: max(d.choices, key=architecture.rank).name for d in self.dimensions.values()}
        initial = {**largest, **dict(initial_choices or {})}
        for decision, name in initial.items():
            if decision not in seen or architecture.get(name) not in seen[decision]:
                raise ValueError(f"Layer {self.name!r}: initial choice {name!r} of {decision!r} is not among its "
                                 f"decisions {({d: [c.name for c in cs] for d, cs in seen.items()})}.")
        self._initial_choices = initial
        object.__setattr__(self, "_format_state", None)
        object.__setattr__(self, "_private_state", False)

    @property
    def decisions(self) -> dict[str, tuple[architecture.ArchitectureChoice, ...]]:
        """The architecture decisions this layer reads, with their choices."""
        return {d.decision: d.choices for d in self.dimensions.values()}

    def _ensure_state(self):
        if self._format_state is None:
            state = format_state.FormatState({n: [c.name for c in cs] for n, cs in self.decisions.items()},
                                             name=f"{self.name}_choices")
            state.set(self._initial_choices)
            object.__setattr__(self, "_format_state", state)
            object.__setattr__(self, "_private_state", True)

    def bind_formats(self, state: format_state.FormatState):
        """Makes `state` (a SearchModel's) the source of this layer's choices; the choices it held carry over.

        Raises:
            ValueError: when `state` lacks a decision of this layer or gives it
                other choices, or the layer already reads another model's state.
        """
        if self._format_state is state:
            return
        if self._format_state is not None and not self._private_state:
            raise ValueError(f"Layer {self.name!r} already belongs to another searchable model.")
        for name, choices in self.decisions.items():
            if state.choices.get(name) != choices:
                raise ValueError(f"Layer {self.name!r}: decision {name!r} has other choices in the model's state.")
        state.set(self.current_choices())
        object.__setattr__(self, "_format_state", state)
        object.__setattr__(self, "_private_state", False)

    def current_choices(self) -> dict[str, str]:
        """The name of the choice each decision of this layer holds now."""
        if self._format_state is None:
            return dict(self._initial_choices)
        held = self._format_state.formats()
        return {name: held[name].name for name in self.decisions}

    def chosen_size(self, role: str) -> int:
        """The size the current choice of dimension `role` sets."""
        dim = self.dimensions[role]
        return dim.size(architecture.get(self.current_choices()[dim.decision]))

    def _pick(self, role: str, table: np.ndarray):
        """The row of `table` ([choices, ...], one row per choice of dimension `role`) the current choice selects.

        Masks are tables of constants built when the step is traced, so a step reads its choice with one gather.
        """
        self._ensure_state()
        return ops.take(ops.convert_to_tensor(table), self._format_state.index(self.dimensions[role].decision), axis=0)

    def _channel_mask(self, role: str, dtype):
        """1 for the channels the current choice of `role` keeps, 0 beyond, as a [maximum] tensor."""
        dim = self.dimensions[role]
        table = (np.arange(dim.maximum)[None, :] < np.asarray(dim.sizes)[:, None]).astype(_numpy_dtype(dtype))
        return self._pick(role, table)

    def cost_factors(self) -> list[CostFactor]:
        """What each dimension multiplies the layer's MACs and parameters by (a kernel side counts squared)."""
        return [CostFactor.of(d, 2 if role == "kernel" else 1) for role, d in self.dimensions.items()]

    def _dimension_config(self) -> dict[str, Any]:
        config = {role: d.get_config() for role, d in self.dimensions.items()}
        if self._format_state is None or self._private_state:
            config["initial_choices"] = self.current_choices()
        return config


@keras.saving.register_keras_serializable(package="fliqs_keras")
class ChannelMask(_Decides, keras.layers.Layer):
    """Zeroes the channels beyond the count its decision chose: a narrower layer on the same weights.

    Args:
        channels: the `Dimension` of the channel count (its maximum is the
            input's last axis).
        initial_choices: ``{decision: choice name}`` held when used alone.
    """

    def __init__(self, channels: Dimension | Mapping, initial_choices: Mapping[str, str] | None = None, **kwargs):
        super().__init__(**kwargs)
        self._init_dimensions({"channels": channels}, initial_choices)

    def build(self, input_shape):
        if input_shape[-1] != self.dimensions["channels"].maximum:
            raise ValueError(f"ChannelMask {self.name!r} masks {self.dimensions['channels'].maximum} channels, "
                             f"but its input has {input_shape[-1]}.")
        self._ensure_state()

    def call(self, inputs):
        return inputs * self._channel_mask("channels", inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), **self._dimension_config()}


@keras.saving.register_keras_serializable(package="fliqs_keras")
class SkippableAdd(_Decides, keras.layers.Layer):
    """``inputs + branch`` where the block is kept, ``inputs`` where it is skipped (the identity choice).

    Args:
        block: the `Dimension` of the block (size 1: kept, 0: skipped).
        initial_choices: ``{decision: choice name}`` held when used alone.
    """

    def __init__(self, block: Dimension | Mapping, initial_choices: Mapping[str, str] | None = None, **kwargs):
        super().__init__(**kwargs)
        self._init_dimensions({"block": block}, initial_choices)

    def build(self, input_shape):
        self._ensure_state()

    def call(self, inputs):
        shortcut, branch = inputs
        # At "keep" this is shortcut + branch exactly (1.0 * x == x), as the plain block's Add.
        keep = self._pick("block", np.asarray(self.dimensions["block"].sizes, _numpy_dtype(branch.dtype)))
        return shortcut + keep * branch

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), **self._dimension_config()}


@keras.saving.register_keras_serializable(package="fliqs_keras")
class MaskedConv2D(_Decides, keras.layers.Conv2D):
    """A Conv2D of the largest channel counts whose inputs and outputs a decision may narrow.

    The inputs beyond the chosen count arrive as zeros (a `ChannelMask` before
    it), so the computation needs no mask; `active_weight` masks the unused
    input rows of the kernel for the quantizer, so that a weight's scale is
    that of the rows the chosen architecture uses. The output channels are
    masked after the layer's batch norm and activation.

    Args:
        input_channels, output_channels: the `Dimension` of each channel count, or None.
        block: the `Dimension` of the block it belongs to (it costs nothing when skipped), or None.
        initial_choices: ``{decision: choice name}`` held when used alone.
        **kwargs: Conv2D's arguments, at the largest channel count.
    """

    def __init__(self, *args, input_channels=None, output_channels=None, block=None, initial_choices=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_dimensions({"input_channels": input_channels, "output_channels": output_channels, "block": block},
                              initial_choices)

    def build(self, input_shape):
        super().build(input_shape)
        for role, have in (("input_channels", input_shape[-1]), ("output_channels", self.filters)):
            if role in self.dimensions and have != self.dimensions[role].maximum:
                raise ValueError(f"MaskedConv2D {self.name!r}: {role} {have} are not the largest choice "
                                 f"{self.dimensions[role].maximum}.")
        self._ensure_state()

    def active_weight(self, path: str, value):
        """`value` of weight `path` with the input rows the chosen architecture leaves unused zeroed."""
        if path != "kernel" or "input_channels" not in self.dimensions:
            return value
        mask = self._channel_mask("input_channels", value.dtype)
        return value * ops.reshape(mask, (1,) * (len(value.shape) - 2) + (-1, 1))

    def plain_config(self) -> dict[str, Any]:
        """The config of the plain Conv2D of the current choices."""
        config = keras.layers.Conv2D.get_config(self)
        if "output_channels" in self.dimensions:
            config["filters"] = self.chosen_size("output_channels")
        return config

    def get_config(self):
        return {**super().get_config(), **self._dimension_config()}


@keras.saving.register_keras_serializable(package="fliqs_keras")
class MaskedDepthwiseConv2D(_Decides, keras.layers.DepthwiseConv2D):
    """A DepthwiseConv2D of the largest kernel whose chosen kernel is its centre, on one weight tensor.

    Args:
        kernel: the `Dimension` of the kernel side (odd sizes; the layer's
            kernel_size is the largest), or None.
        channels: the `Dimension` of its channel count (for the cost: the
            masked channels arrive as zeros), or None.
        block: the `Dimension` of the block it belongs to, or None.
        initial_choices: ``{decision: choice name}`` held when used alone.
        **kwargs: DepthwiseConv2D's arguments, at the largest kernel.
    """

    def __init__(self, *args, kernel=None, channels=None, block=None, initial_choices=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_dimensions({"kernel": kernel, "channels": channels, "block": block}, initial_choices)
        if self.data_format != "channels_last":
            raise ValueError(f"MaskedDepthwiseConv2D {self.name!r} needs data_format='channels_last'.")
        if "kernel" in self.dimensions:
            sides = self.dimensions["kernel"].sizes
            if any(s % 2 == 0 for s in sides) or self.kernel_size != (max(sides),) * 2:
                raise ValueError(f"MaskedDepthwiseConv2D {self.name!r}: kernel sides must be odd and kernel_size the "
                                 f"largest, square; got sides {list(sides)} and kernel_size {self.kernel_size}.")

    def build(self, input_shape):
        super().build(input_shape)
        self._ensure_state()

    def active_weight(self, path: str, value):
        """`value` of weight `path` with the kernel outside the chosen centre zeroed."""
        if path != "kernel" or "kernel" not in self.dimensions:
            return value
        side = value.shape[0]
        offset = np.abs(np.arange(side) - (side - 1) // 2)
        inside = (offset[None, :] <= (np.asarray(self.dimensions["kernel"].sizes)[:, None] - 1) // 2)
        table = (inside[:, :, None] & inside[:, None, :]).astype(_numpy_dtype(value.dtype))[..., None, None]
        return value * self._pick("kernel", table)

    def call(self, inputs):
        outputs = ops.depthwise_conv(inputs, self.active_weight("kernel", self.kernel), strides=self.strides,
                                     padding=self.padding, dilation_rate=self.dilation_rate,
                                     data_format=self.data_format)
        if self.use_bias:
            outputs = outputs + self.bias
        return self.activation(outputs) if self.activation is not None else outputs

    def plain_config(self) -> dict[str, Any]:
        """The config of the plain DepthwiseConv2D of the current choices."""
        config = keras.layers.DepthwiseConv2D.get_config(self)
        if "kernel" in self.dimensions:
            config["kernel_size"] = (self.chosen_size("kernel"),) * 2
        return config

    def get_config(self):
        return {**super().get_config(), **self._dimension_config()}


def is_architecture(layer: Any) -> bool:
    """Whether `layer` reads an architecture decision."""
    return isinstance(layer, _Decides)


def inverted_residual(x, name: str, *, kernel_sizes=(3,), expansions=(6,), output_channels: Dimension | int,
                      stride: int = 1, input_channels: Dimension | None = None, skippable: bool = False):
    """MobileNetV2's inverted-residual block with searchable kernel size, expansion ratio and presence.

    The layers are named as `models.mobilenet_v2` names them, so that at its
    largest choices the block holds exactly the plain block's layers and
    weights (masks and the skip are identities there).

    Args:
        x: the block's input tensor, at the largest channel count.
        name: the block's name; its decisions are ``{name}/kernel``,
            ``{name}/expansion`` and ``{name}/skip``.
        kernel_sizes: the depthwise kernel sides to choose from (odd).
        expansions: the expansion ratios to choose from; ``(1,)``: no
            expansion layer (MobileNetV2's first block).
        output_channels: the output's channel count, or its `Dimension`
            (a stage's width decision).
        stride: the depthwise stride.
        input_channels: the `Dimension` of the input's channels, None when fixed.
        skippable: whether the identity is a choice (needs stride 1 and
            as many output channels as input channels).

    Returns:
        The block's output tensor.

    Raises:
        ValueError: for a skippable block whose shapes do not allow the identity.
    """
    channels = x.shape[-1]
    out_max = output_channels.maximum if isinstance(output_channels, Dimension) else int(output_channels)
    output_dim = output_channels if isinstance(output_channels, Dimension) else None
    residual = stride == 1 and channels == out_max
    if skippable and not residual:
        raise ValueError(f"Block {name!r} cannot be skipped: stride {stride}, {channels} -> {out_max} channels.")
    block = architecture.dimension(f"{name}/skip", ("skip", "keep"), (0, 1)) if skippable else None
    kernel = (architecture.dimension(f"{name}/kernel", [f"kernel{k}" for k in sorted(kernel_sizes)],
                                     sorted(kernel_sizes)) if len(kernel_sizes) > 1 else None)
    norm = {"momentum": 0.9, "epsilon": 1e-3}
    inputs, hidden = x, input_channels
    if tuple(expansions) != (1,):
        ratios = sorted(expansions)
        hidden = (architecture.dimension(f"{name}/expansion", [f"expand{e}" for e in ratios],
                                         [e * channels for e in ratios]) if len(ratios) > 1 else None)
        x = _conv(x, max(ratios) * channels, f"{name}_expand", input_channels, hidden, block)
        x = keras.layers.BatchNormalization(**norm, name=f"{name}_expand_bn")(x)
        x = keras.layers.ReLU(6.0, name=f"{name}_expand_relu")(x)
        x = ChannelMask(hidden, name=f"{name}_expand_mask")(x) if hidden is not None else x
    dims = {"kernel": kernel, "channels": hidden, "block": block}
    depthwise = dict(kernel_size=max(kernel_sizes), strides=stride, padding="same", use_bias=False,
                     name=f"{name}_depthwise")
    if any(d is not None for d in dims.values()):
        x = MaskedDepthwiseConv2D(**depthwise, **dims)(x)
    else:
        x = keras.layers.DepthwiseConv2D(**depthwise)(x)
    x = keras.layers.BatchNormalization(**norm, name=f"{name}_depthwise_bn")(x)
    x = keras.layers.ReLU(6.0, name=f"{name}_depthwise_relu")(x)
    # A masked channel is zero before the depthwise but not after its batch norm: mask it again.
    x = ChannelMask(hidden, name=f"{name}_depthwise_mask")(x) if hidden is not None else x
    x = _conv(x, out_max, f"{name}_project", hidden, output_dim, block)
    x = keras.layers.BatchNormalization(**norm, name=f"{name}_project_bn")(x)
    x = ChannelMask(output_dim, name=f"{name}_project_mask")(x) if output_dim is not None else x
    if block is not None:
        return SkippableAdd(block, name=f"{name}_add")([inputs, x])
    return keras.layers.Add(name=f"{name}_add")([inputs, x]) if residual else x


def _conv(x, filters: int, name: str, input_channels, output_channels, block):
    """A 1x1 convolution, masked where any of its dimensions is searched."""
    if input_channels is None and output_channels is None and block is None:
        return keras.layers.Conv2D(filters, 1, use_bias=False, name=name)(x)
    return MaskedConv2D(filters, 1, use_bias=False, input_channels=input_channels, output_channels=output_channels,
                        block=block, name=name)(x)
