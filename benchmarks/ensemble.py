"""Held-out perplexity of an ensemble: the mean of several runs' next-token probabilities.

    python benchmarks/ensemble.py RUN [RUN ...] [--split valid] [--batch-size B] [--num-steps T]

Every run is loaded from its best checkpoint and scored on the first run's held-out split, cut as that
run's training cut it (``deeprnn.cli.checkpoint_split_tokens``), into the first run's evaluation streams
(``eval_batch_size`` contiguous streams, windows of ``eval_num_steps``, state carried; ``--batch-size`` and
``--num-steps`` override), each model in its own run's precision. The runs must share the vocabulary and
the scored text. Prints each model's perplexity and the ensemble's: exp of the mean over scored tokens of
−log(mean over models of p(next token)).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from deeprnn.checkpoint import load_checkpoint  # noqa: E402
from deeprnn.cli import checkpoint_split_tokens  # noqa: E402
from deeprnn.errors import ConfigError, DeepRNNError  # noqa: E402
from deeprnn.train import heldout_streams, heldout_windows  # noqa: E402
from deeprnn.cli import OneLineParser  # noqa: E402


@torch.no_grad()
def token_log_probs(model, streams_x, streams_y, num_steps: int, precision: str) -> torch.Tensor:
    """(B, L) float64 log-probabilities the model gives each next token, windows of ``num_steps``."""
    out = [logits.double().log_softmax(-1).gather(-1, Y.T.unsqueeze(-1)).squeeze(-1).T  # (B, T)
           for logits, Y in heldout_windows(model, streams_x, streams_y, num_steps=num_steps,
                                            device=torch.device("cpu"), precision=precision)]
    return torch.cat(out, 1)


def ensemble_perplexities(runs: list[str], split: str = "valid", batch_size: int | None = None,
                          num_steps: int | None = None) -> tuple[list[float], float, int]:
    """Each run's perplexity, the ensemble's, and the number of tokens scored. ``batch_size`` and
    ``num_steps`` default to the first run's evaluation settings; ConfigError if either is below 1."""
    for name, value in (("batch_size", batch_size), ("num_steps", num_steps)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    cks = [load_checkpoint(r) for r in runs]
    tokens = checkpoint_split_tokens(cks[0], split)
    for r, ck in zip(runs[1:], cks[1:]):
        if ck.vocab.idx_to_token != cks[0].vocab.idx_to_token:
            raise DeepRNNError(f"{r} has another vocabulary than {runs[0]}; an ensemble needs one vocabulary")
        if not torch.equal(checkpoint_split_tokens(ck, split), tokens):
            raise DeepRNNError(f"{r}'s {split} split differs from {runs[0]}'s; an ensemble scores one text")
    cfg = cks[0].train_config
    streams = heldout_streams(tokens, batch_size if batch_size is not None else cfg.get("eval_batch_size") or 64)
    if streams is None:
        raise DeepRNNError(f"the {split} split has {tokens.numel()} tokens; need at least 3 to score")
    steps = num_steps if num_steps is not None else cfg.get("eval_num_steps") or 128
    logps = torch.stack([token_log_probs(ck.model, *streams, steps, ck.train_config.get("precision", "fp32"))
                         for ck in cks])  # (K, B, L)
    singles = [math.exp(-lp.mean().item()) for lp in logps]
    mixed = torch.logsumexp(logps, 0) - math.log(len(cks))
    return singles, math.exp(-mixed.mean().item()), mixed.numel()


def main(argv=None) -> int:
    p = OneLineParser(prog="ensemble.py", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories or checkpoints")
    p.add_argument("--split", default="valid", choices=["train", "valid", "test"])
    p.add_argument("--batch-size", type=int, default=None, help="streams (default: the first run's eval_batch_size)")
    p.add_argument("--num-steps", type=int, default=None, help="window (default: the first run's eval_num_steps)")
    args = p.parse_args(argv)
    for flag, value in (("--batch-size", args.batch_size), ("--num-steps", args.num_steps)):
        if value is not None and value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    try:
        singles, ensemble, n = ensemble_perplexities(args.runs, args.split, args.batch_size, args.num_steps)
    except DeepRNNError as err:
        print(f"ensemble.py: error: {err}", file=sys.stderr)
        return 2
    for run, ppl in zip(args.runs, singles):
        print(f"{run}: perplexity {ppl:.3f}")
    print(f"ensemble of {len(args.runs)}: perplexity {ensemble:.3f} on {n:,} {args.split} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
