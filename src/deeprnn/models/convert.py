"""Weight mapping between the scratch and concise implementations.

Per layer l (G gate blocks of H rows/columns, same gate order on both sides):

    scratch                      torch.nn (concise)
    W_xh  (in, G*H)        <->   weight_ih_l{l}  (G*H, in)   transpose
    W_hh  (H,  G*H)        <->   weight_hh_l{l}  (G*H, H)    transpose
    b_h   (G*H,)           <->   bias_ih_l{l} + bias_hh_l{l}            (RNN, LSTM)
    b_h, b_hn              <->   bias_ih + [b_hr, b_hz, 0], b_hn        (torch-variant GRU)

torch keeps two biases where the book keeps one; going to concise the sum goes into ``bias_ih`` and
``bias_hh`` is zero (GRU: ``bias_hh`` keeps only ``b_hn``). Both directions preserve the function
exactly; the book-variant GRU (``gru_variant='d2l'``), layer-normalised cells and zoneout have no torch.nn
form, and are refused.
"""

from __future__ import annotations

import dataclasses

import torch

from deeprnn.errors import ConfigError
from deeprnn.models.base import LanguageModel
from deeprnn.models.concise import ConciseModel
from deeprnn.models.config import ModelConfig
from deeprnn.models.scratch import ScratchModel

StateDict = dict[str, torch.Tensor]


def _check_convertible(config: ModelConfig) -> None:
    """Only a model with a torch.nn form converts: the state-dict functions would otherwise drop a layer-norm
    model's gains and biases, or a zoneout model's expected update, and return another function's weights."""
    if config.cell == "gru" and config.gru_variant != "torch":
        raise ConfigError(
            "gru_variant='d2l' has no torch.nn form, so it cannot be converted; use gru_variant='torch'"
        )
    if config.layer_norm:
        raise ConfigError("layer_norm has no torch.nn form, so it cannot be converted; keep the model "
                          "impl='scratch'")
    if config.zoneout:
        raise ConfigError("zoneout_cell and zoneout_hidden have no torch.nn form, so the model cannot be "
                          "converted; keep it impl='scratch'")


def state_dict_to_concise(sd: StateDict, config: ModelConfig) -> StateDict:
    """Scratch state dict -> concise state dict (new tensors; non-RNN entries copied as is)."""
    _check_convertible(config)
    H = config.num_hiddens
    out = {k: v for k, v in sd.items() if not k.startswith("layers.")}
    for l in range(config.num_layers):
        p = f"layers.{l}."
        b_h = sd[p + "b_h"]
        out[f"rnn.weight_ih_l{l}"] = sd[p + "W_xh"].T.contiguous()
        out[f"rnn.weight_hh_l{l}"] = sd[p + "W_hh"].T.contiguous()
        out[f"rnn.bias_ih_l{l}"] = b_h.clone()
        b_hh = torch.zeros_like(b_h)
        if config.cell == "gru":
            b_hh[2 * H :] = sd[p + "b_hn"]
        out[f"rnn.bias_hh_l{l}"] = b_hh
    return out


def state_dict_to_scratch(sd: StateDict, config: ModelConfig) -> StateDict:
    """Concise state dict -> scratch state dict (new tensors; non-RNN entries copied as is)."""
    _check_convertible(config)
    H = config.num_hiddens
    out = {k: v for k, v in sd.items() if not k.startswith("rnn.")}
    for l in range(config.num_layers):
        p = f"layers.{l}."
        b_ih, b_hh = sd[f"rnn.bias_ih_l{l}"], sd[f"rnn.bias_hh_l{l}"]
        out[p + "W_xh"] = sd[f"rnn.weight_ih_l{l}"].T.contiguous()
        out[p + "W_hh"] = sd[f"rnn.weight_hh_l{l}"].T.contiguous()
        if config.cell == "gru":
            b_h = b_ih.clone()
            b_h[: 2 * H] += b_hh[: 2 * H]  # r, z: the biases simply add
            out[p + "b_h"] = b_h
            out[p + "b_hn"] = b_hh[2 * H :].clone()  # n: r multiplies b_hn, so it stays apart
        else:
            out[p + "b_h"] = b_ih + b_hh
    return out


def _like(source: LanguageModel, cls: type, impl: str, sd: StateDict) -> LanguageModel:
    config = dataclasses.replace(source.config, impl=impl)
    p = source.output.weight
    model = cls(config).to(device=p.device, dtype=p.dtype)
    model.load_state_dict(sd)
    model.train(source.training)
    return model


def _check_impl(model, cls: type, name: str) -> None:
    if not isinstance(model, cls):
        impl = getattr(getattr(model, "config", None), "impl", None)
        got = f"a model with impl={impl!r}" if impl else type(model).__name__
        raise ConfigError(f"{name} takes a {cls.__name__}, got {got}"
                          + ("; it is already what you asked for" if impl and name.endswith(impl) else ""))


def scratch_to_concise(model: ScratchModel) -> ConciseModel:
    """A new ``ConciseModel`` computing the same function as ``model`` (same device, dtype, mode)."""
    _check_impl(model, ScratchModel, "scratch_to_concise")
    sd = state_dict_to_concise(model.state_dict(), model.config)
    return _like(model, ConciseModel, "concise", sd)


def concise_to_scratch(model: ConciseModel) -> ScratchModel:
    """A new ``ScratchModel`` computing the same function as ``model`` (same device, dtype, mode)."""
    _check_impl(model, ConciseModel, "concise_to_scratch")
    sd = state_dict_to_scratch(model.state_dict(), model.config)
    return _like(model, ScratchModel, "scratch", sd)
