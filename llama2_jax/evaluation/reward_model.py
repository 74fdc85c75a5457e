"""Reward-model evaluation on held-out preference pairs: accuracy per rating level (as in Table 8 of Touvron et al.
2023, where accuracy is reported per preference rating), mean margin, and a histogram of chosen vs rejected scores.

    python -m llama2_jax.evaluate --reward_model=DIR --pairs=FILE [--tokenizer=FILE] [--histogram=PNG]

A pair counts as right when score(chosen) > score(rejected) (a tie is wrong, as in the trainer's accuracy). Scores are
`reward_model.score`'s sigmoid scores in [0, 1]; the margin is their mean difference (chosen - rejected).
"""

from __future__ import annotations

import pathlib
from typing import Optional, Sequence

import numpy as np

from llama2_jax.checkpoints.params_io import load_params
from llama2_jax.data.preferences import read_preferences
from llama2_jax.inference.reward_scores import score
from llama2_jax.text.tokenizer import Tokenizer

RATING_ORDER = ("significantly_better", "better", "slightly_better", "negligibly_better", "unrated")


def score_pairs(reward_model_dir, pairs_file, tokenizer_path, *, batch_size: int = 8, mesh=None
                ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(chosen scores [P], rejected scores [P], rating level per pair) for every pair of `pairs_file`.

    The one place that touches the reward-model and preference-data APIs."""

    params, cfg = load_params(reward_model_dir, kind="score")
    tokenizer = Tokenizer(tokenizer_path)
    pairs, _ = read_preferences(pairs_file)
    if not pairs:
        raise ValueError(f"{pairs_file}: no preference pairs")
    items = [list(p.prompt) + [{"role": "assistant", "content": response}]
             for p in pairs for response in (p.chosen, p.rejected)]
    scores = score(params, cfg, items, tokenizer, batch_size=batch_size, mesh=mesh)
    return scores[0::2], scores[1::2], [p.rating or "unrated" for p in pairs]


def pair_metrics(chosen: np.ndarray, rejected: np.ndarray, ratings: Sequence[str]) -> dict[str, float]:
    """{"accuracy", "margin", "n"} over all pairs plus "accuracy_L", "n_L" per rating level L that has pairs."""
    chosen, rejected = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
    ratings = np.asarray(ratings)
    unknown = sorted(set(ratings) - set(RATING_ORDER))
    if unknown:
        raise ValueError(f"unknown rating levels {unknown}; expected {RATING_ORDER}")
    correct = chosen > rejected
    out = {"n": float(len(correct)), "accuracy": float(correct.mean()), "margin": float((chosen - rejected).mean())}
    for level in RATING_ORDER:
        in_level = ratings == level
        if in_level.any():
            out[f"n_{level}"] = float(in_level.sum())
            out[f"accuracy_{level}"] = float(correct[in_level].mean())
    return out


def format_table(metrics: dict[str, float]) -> str:
    """Accuracy per rating level, then all pairs and the mean margin, as printed by the CLI."""
    lines = [f"{'rating':<22}{'pairs':>7}{'accuracy':>10}"]
    for level in RATING_ORDER:
        if f"n_{level}" in metrics:
            lines.append(f"{level:<22}{int(metrics[f'n_{level}']):>7}{100 * metrics[f'accuracy_{level}']:>9.1f}%")
    lines.append(f"{'all':<22}{int(metrics['n']):>7}{100 * metrics['accuracy']:>9.1f}%")
    lines.append(f"mean margin (chosen - rejected score): {metrics['margin']:.4f}")
    return "\n".join(lines)


def write_histogram(chosen: np.ndarray, rejected: np.ndarray, path, bins: int = 40) -> None:
    """PNG with overlaid histograms of the chosen and rejected scores (on the same bins)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    low, high = float(min(chosen.min(), rejected.min())), float(max(chosen.max(), rejected.max()))
    edges = np.linspace(low, high if high > low else low + 1e-6, bins + 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(chosen, bins=edges, alpha=0.6, label=f"chosen (mean {chosen.mean():.3f})")
    ax.hist(rejected, bins=edges, alpha=0.6, label=f"rejected (mean {rejected.mean():.3f})")
    ax.set_xlabel("reward score (sigmoid)")
    ax.set_ylabel("pairs")
    ax.legend()
    fig.tight_layout()
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(reward_model_dir, pairs_file, tokenizer_path, histogram: Optional[str], batch_size: int = 8) -> dict:
    """Score, print the table, write the histogram; returns the metrics."""
    chosen, rejected, ratings = score_pairs(reward_model_dir, pairs_file, tokenizer_path, batch_size=batch_size)
    metrics = pair_metrics(chosen, rejected, ratings)
    print(format_table(metrics))
    if histogram:
        write_histogram(chosen, rejected, histogram)
        print(f"wrote {histogram}")
    return metrics
