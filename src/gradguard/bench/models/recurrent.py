"""The recurrent networks ``rnn``, ``lstm`` and ``gru``, whose recurrent ``init_scale`` pushes the
spectral radius past 1."""

from __future__ import annotations

import torch
from torch import nn

from ...errors import ConfigError
from .common import _at_least, _doc, _positive
from .registry import register


class RecurrentNet(nn.Module):
    """A recurrent stack over ``(B, T, F)`` and a linear readout of the last step's hidden state."""

    def __init__(self, rnn: nn.RNNBase, num_outputs: int, features: int):
        super().__init__()
        self.features = features
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x.reshape(x.shape[0], -1, self.features))
        return self.head(out[:, -1])


def _recurrent(
    cls: type[nn.RNN | nn.LSTM | nn.GRU],
    input_shape: tuple[int, ...],
    num_outputs: int,
    hidden: int,
    layers: int,
    init_scale: float,
) -> nn.Module:
    _at_least("hidden", hidden, 1)
    _at_least("layers", layers, 1)
    _positive("init_scale", init_scale)
    if len(input_shape) == 1:
        features = 1
    elif len(input_shape) == 2:
        features = input_shape[1]
    else:
        raise ConfigError(f"input_shape must be (T, F) or (T,) for sequences, got {input_shape}")
    rnn = cls(features, hidden, num_layers=layers, batch_first=True)
    with torch.no_grad():
        for pname, p in rnn.named_parameters():
            if pname.startswith("weight_hh"):
                p.mul_(init_scale)
    return RecurrentNet(rnn, num_outputs, features)


_RECURRENT_DOC = """{title} over sequences ``(T, F)`` (or ``(T,)``, one feature); batch ``(B, T, F)``.

    ``layers`` stacked ``nn.{cls}`` layers of ``hidden`` units (PyTorch's init,
    U(-1/sqrt(hidden), 1/sqrt(hidden))), read out by a linear layer on the last time step's hidden
    state. ``init_scale`` multiplies the recurrent weights ``weight_hh`` only: the gradient through
    T steps scales like the recurrent Jacobian to the power T, so a spectral radius above 1
    explodes it (Pascanu et al. 2013). The default init has a radius near 1/sqrt(3) ~ 0.58 per
    gate matrix, so ``init_scale`` >~ 2 makes a vanilla RNN explode. {extra}
    """


@register("rnn", inputs="sequence")
@_doc(
    _RECURRENT_DOC,
    title="Vanilla tanh RNN (Elman 1990)",
    cls="RNN",
    extra="The family where gradients explode most readily.",
)
def rnn(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    hidden: int = 128,
    layers: int = 1,
    init_scale: float = 1.0,
) -> nn.Module:
    return _recurrent(nn.RNN, input_shape, num_outputs, hidden, layers, init_scale)


@register("lstm", inputs="sequence")
@_doc(
    _RECURRENT_DOC,
    title="LSTM (Hochreiter & Schmidhuber 1997)",
    cls="LSTM",
    extra="Its gates damp the explosion that a vanilla RNN shows at the same scale.",
)
def lstm(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    hidden: int = 128,
    layers: int = 1,
    init_scale: float = 1.0,
) -> nn.Module:
    return _recurrent(nn.LSTM, input_shape, num_outputs, hidden, layers, init_scale)


@register("gru", inputs="sequence")
@_doc(
    _RECURRENT_DOC,
    title="GRU (Cho et al. 2014)",
    cls="GRU",
    extra="Gated like the LSTM, with one state and three gates.",
)
def gru(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    hidden: int = 128,
    layers: int = 1,
    init_scale: float = 1.0,
) -> nn.Module:
    return _recurrent(nn.GRU, input_shape, num_outputs, hidden, layers, init_scale)
