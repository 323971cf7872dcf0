"""Dynamic evaluation (Krause et al. 2018): score held-out text while adapting to it.

Static evaluation scores every held-out token with the trained weights. Dynamic evaluation reads the
text in order, one segment at a time: it scores the segment with the current weights, *then* takes a
gradient step on that segment's loss, so later text is predicted by a model that has adapted to the
earlier text (its names, its topic, its style). No token is ever scored by weights that have seen it,
so this is still a held-out score, but a different protocol from the static one: it is reported
separately and never mixed with static numbers (AWD-LSTM and Krause et al. report both).

Two update rules, both with an optional decay back towards the trained weights ``θ0``:

    sgd:  θ ← θ − lr · g + decay · (θ0 − θ)
    rms:  θ ← θ − lr · g / (√MS + ε) + decay · (θ0 − θ) ⊙ min(√MS / mean(√MS), 1/decay)

where ``g`` is the gradient of the window's mean loss and ``MS`` the mean square of such gradients over
windows of the *training* text (:func:`gradient_mean_square`), Krause et al.'s "RMS with a global prior":
each weight moves in proportion to how much training moved it, and the weights that move most are
pulled back hardest. ``lr = 0`` is static evaluation with the same streams and windows (a test checks
the equality). The caller's model is restored to ``θ0`` afterwards.
"""

from __future__ import annotations

import torch

from deeprnn.errors import ConfigError
from deeprnn.models.base import detach_state
from deeprnn.precision import autocast_context
from deeprnn.train import heldout_streams, sequence_loss


def dynamic_evaluate_tokens(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    *,
    lr: float,
    decay: float = 0.0,
    mean_square: list[torch.Tensor] | None = None,
    eps: float = 1e-5,
    batch_size: int = 1,
    num_steps: int = 50,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> tuple[float, int]:
    """Sum of next-token cross-entropy (nats) over ``tokens`` under dynamic evaluation, and the count.

    Streams and windows are cut exactly as :func:`deeprnn.train.evaluate_tokens` cuts them (``batch_size``
    contiguous streams, ``num_steps`` per window, state carried); ``batch_size=1`` reads the text in
    its own order, which is what lets the model adapt to it. Each window is scored first, then the
    weights take one step on that window's mean loss. Dropout and weight-drop are off (eval mode).
    ``mean_square`` (from :func:`gradient_mean_square`, one tensor per trainable parameter) selects the
    RMS rule; without it the rule is plain SGD.
    """
    if not lr >= 0:
        raise ConfigError(f"dynamic evaluation learning rate must be >= 0, got {lr}")
    if not lr <= 3e38:  # inf too: the update would overflow float32 weights
        raise ConfigError(f"dynamic evaluation learning rate must be <= 3e38 (what float32 weights can take), "
                          f"got {lr}")
    if not 0 <= decay <= 1:
        raise ConfigError(f"dynamic evaluation decay must be in [0, 1], got {decay}")
    device = torch.device(device)
    streams = heldout_streams(tokens, batch_size)
    if streams is None:
        return 0.0, 0
    streams_x, streams_y = streams
    params = [p for p in model.parameters() if p.requires_grad]
    theta0 = [p.detach().clone() for p in params]
    # Per parameter: what the gradient step is multiplied by, and the fraction of (θ0 − θ) pulled back.
    scale, pull = [1.0] * len(params), [decay] * len(params)  # SGD
    if mean_square is not None:
        if [m.shape for m in mean_square] != [p.shape for p in params]:
            raise ConfigError("mean_square must hold one tensor per trainable parameter, shaped like it")
        rms = [m.to(p.device, p.dtype).sqrt() for m, p in zip(mean_square, params)]
        mean_rms = torch.cat([r.flatten() for r in rms]).mean()
        scale = [1 / (r + eps) for r in rms]
        pull = [(r / mean_rms).clamp(max=1 / decay) * decay if decay else 0.0 for r in rms]
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    state = model.begin_state(streams_x.shape[0], device=device)
    try:
        for s in range(0, streams_x.shape[1], num_steps):
            Y = streams_y[:, s : s + num_steps]
            loss, state = _window_loss(model, streams_x[:, s : s + num_steps], Y, state, device, precision,
                                       reduction="sum")
            total += loss.detach().double()
            if lr == 0:
                continue
            grads = torch.autograd.grad(loss / Y.numel(), params, allow_unused=True)
            with torch.no_grad():
                for p, g, p0, k, q in zip(params, grads, theta0, scale, pull):
                    if g is not None:
                        p.sub_(g.to(p.dtype) * k, alpha=lr)
                    if decay:
                        p.add_((p0 - p) * q)
    finally:
        with torch.no_grad():
            for p, p0 in zip(params, theta0):
                p.copy_(p0)
        model.train(was_training)
    return float(total), streams_x.numel()


def gradient_mean_square(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    *,
    num_steps: int = 50,
    max_windows: int = 400,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> list[torch.Tensor]:
    """Mean over windows of the squared gradient of each window's mean loss, one tensor per trainable
    parameter: the statistics of the RMS rule. ``tokens`` should be training text; one stream, state
    carried, up to ``max_windows`` windows of ``num_steps`` spread evenly over it (eval mode)."""
    device = torch.device(device)
    n = tokens.numel() - 1
    if n < num_steps:
        raise ConfigError(f"the RMS rule's gradient statistics need at least {num_steps + 1} training tokens, "
                          f"got {n + 1}; pass a smaller --num-steps or --dynamic-rule sgd")
    count = min(max_windows, n // num_steps)
    starts = [round(i * (n - num_steps) / max(count - 1, 1)) for i in range(count)]
    params = [p for p in model.parameters() if p.requires_grad]
    ms = [torch.zeros_like(p) for p in params]
    was_training = model.training
    model.eval()
    state = model.begin_state(1, device=device)
    try:
        for s in starts:
            loss, state = _window_loss(model, tokens[s : s + num_steps].view(1, -1),
                                       tokens[s + 1 : s + num_steps + 1].view(1, -1), state, device, precision)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for m, g in zip(ms, grads):
                if g is not None:
                    m.add_(g.to(m.dtype).square())
    finally:
        model.train(was_training)
    return [m / count for m in ms]


def _window_loss(model, X, Y, state, device, precision, reduction="mean"):
    """One window's cross-entropy with a graph to the weights (even under ``no_grad`` callers), from
    ``state`` detached, and the final state."""
    with torch.enable_grad(), autocast_context(device, precision):
        logits, state = model(X.to(device).long(), detach_state(state))
        loss = sequence_loss(logits, Y.to(device).long(), reduction=reduction)
    return loss, state
