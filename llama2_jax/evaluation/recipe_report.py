"""The recipe's evaluations and report (train.recipe): each stage's figures read from the files its trainer wrote,
DIR/REPORT.md (one table per stage) and DIR/plots/<stage>.png (its curves, matplotlib)."""

from __future__ import annotations

import json
import math
import os
from typing import Optional

# Curves per stage kind: (metrics file relative to the stage dir or its product, x key, [y keys]).
LM_CURVES = ("loss", "eval_loss")
CURVES = {"lm": LM_CURVES, "rm": ("loss", "accuracy", "eval_loss", "eval_accuracy"),
          "ppo": ("reward_combined", "eval_reward_combined", "kl"), "rs": LM_CURVES, "cd": LM_CURVES,
          "gatt": LM_CURVES, "pairs": (), "round_eval": (),
          "grpo": ("reward_mean", "reward_combined_mean", "eval_reward_mean", "eval_reward_combined_mean")}
ROUND_FIGURES = ("new_labels", "all_labels", "rm_helpful_accuracy_before", "rm_safety_accuracy_before")
POLICY_FIGURES = ("proxy_helpful_mean", "proxy_safety_mean", "gold_helpful_mean", "gold_safety_mean",
                  "win_rate_vs_sft")


def read_records(path: str) -> list[dict]:
    """metrics.jsonl records merged per step (train and eval records of a step are separate lines; a resumed run
    appends the steps it redoes, the later values win)."""
    if not os.path.isfile(path):
        return []
    by_step: dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                by_step.setdefault(record.get("step", record.get("iteration", len(by_step))), {}).update(record)
    return [by_step[k] for k in sorted(by_step)]


def read_json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def last_value(records: list[dict], key: str) -> Optional[float]:
    values = [r[key] for r in records if key in r]
    return values[-1] if values else None


def lm_figures(records: list[dict]) -> dict:
    """Steps, final train loss, last held-out loss and perplexity of a language-model trainer's metrics.jsonl."""
    figures = {"steps": last_value(records, "step"), "train_loss": last_value(records, "loss"),
               "eval_loss": last_value(records, "eval_loss"), "eval_perplexity": last_value(records, "eval_perplexity")}
    return {k: v for k, v in figures.items() if v is not None}


def curve_file(kind: str, stage_dir: str, output: str) -> str:
    """The metrics.jsonl that holds the stage's training curves."""
    if kind in ("rs", "cd", "gatt") or not os.path.isfile(os.path.join(stage_dir, "metrics.jsonl")):
        return os.path.join(output, "metrics.jsonl")
    return os.path.join(stage_dir, "metrics.jsonl")


def evaluate_stage(kind: str, stage_dir: str, output: str) -> dict:
    """The stage's evaluation figures, read from its outputs (see the module docstring)."""
    records = read_records(curve_file(kind, stage_dir, output))
    if kind == "lm":
        return lm_figures(records)
    if kind == "rm":
        summary = read_json(os.path.join(stage_dir, "rm_eval.json")) or {}
        return {"steps": last_value(records, "step"), "train_pairs": summary.get("train_pairs"),
                "eval_accuracy": summary.get("accuracy"),
                "eval_loss": summary.get("loss"), "eval_pairs": summary.get("eval_pairs"),
                "mean_margin": summary.get("mean_margin")}
    if kind == "rs":
        iterations = read_records(os.path.join(stage_dir, "metrics.jsonl"))
        last = iterations[-1] if iterations else {}
        figures = {"iterations": len(iterations), "reward_mean": last.get("reward_combined_mean"),
                   "best_of_k_mean": last.get("best_of_k_mean"), "pool_reward_mean": last.get("pool_reward_mean")}
        first = iterations[0] if iterations else {}  # a carried-over pool is re-scored in the run's first iteration
        figures.update({k: first[k] for k in ("pool_rescored", "pool_rescored_reward_before_mean",
                                              "pool_rescored_reward_mean") if k in first})
        return {**figures, **{f"sft_{k}": v for k, v in lm_figures(records).items()}}
    if kind == "ppo":
        evals = [r for r in records if "eval_reward_combined" in r]
        best = max(evals, key=lambda r: r["eval_reward_combined"]) if evals else {}
        stopped = read_json(os.path.join(stage_dir, "early_stop.json"))
        return {"iterations": last_value(records, "step"), "first_reward": records[0].get("reward_combined")
                if records else None, "last_reward": last_value(records, "reward_combined"),
                "best_eval_reward": best.get("eval_reward_combined"), "best_eval_iteration": best.get("step"),
                "last_kl": last_value(records, "kl"), "evaluations": len(stopped["evals"]) if stopped else 0}
    if kind == "grpo":
        return grpo_figures(records)
    if kind == "cd":
        summary = read_json(os.path.join(stage_dir, "distill.json")) or {}
        keys = ("prompts", "kept_fraction", "safety_original_mean", "safety_distilled_mean", "safety_gain_all_mean",
                "safety_gain_kept_mean")
        return {**{k: summary.get(k) for k in keys}, **{f"sft_{k}": v for k, v in lm_figures(records).items()}}
    if kind == "gatt":
        summary = read_json(os.path.join(stage_dir, "gatt_stats.json")) or {}
        keys = ("dialogs", "used", "turns_sampled", "records", "stopped_context", "stopped_bad_reply")
        return {**{k: summary.get(k) for k in keys}, **{f"sft_{k}": v for k, v in lm_figures(records).items()}}
    if kind in ("pairs", "round_eval"):  # train.rlhf_round's round.json
        return read_json(os.path.join(stage_dir, "round.json")) or {}
    raise ValueError(f"unknown stage kind {kind!r}; known: lm, rm, rs, ppo, grpo, cd, gatt, pairs, round_eval")


def grpo_figures(records: list[dict]) -> dict:
    """train.grpo's metrics.jsonl: iterations, the first and last training reward (the reward models' Rc when they
    score, else the reward functions' total) and the first and last held-out evaluations."""
    key = "reward_combined_mean" if any("reward_combined_mean" in r for r in records) else "reward_mean"
    eval_key = f"eval_{key}"
    evals = [r for r in records if eval_key in r]
    figures = {"iterations": last_value(records, "step"), "reward": key,
               "first_reward": records[0].get(key) if records else None, "last_reward": last_value(records, key),
               "first_eval_reward": evals[0][eval_key] if evals else None,
               "last_eval_reward": evals[-1][eval_key] if evals else None,
               "first_eval_iteration": evals[0]["step"] if evals else None,
               "last_eval_iteration": evals[-1]["step"] if evals else None}
    return {k: v for k, v in figures.items() if v is not None}


def piqa_figures(out_dir: str) -> dict:
    """acc / acc_norm (and their standard errors) and the number of questions from the newest lm-eval results JSON
    under `out_dir` (lm-eval writes OUT/<model>/results_<date>.json); {} when there is none."""
    found = [os.path.join(root, f) for root, _, files in os.walk(out_dir) for f in files
             if f.startswith("results_") and f.endswith(".json")]
    if not found:
        return {}
    results = read_json(max(found, key=os.path.getmtime))
    task = results["results"]["piqa_local"]
    figures = {f"piqa_{k.split(',')[0]}": v for k, v in task.items() if k.split(",")[0] in
               ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")}
    figures["piqa_questions"] = results.get("n-samples", {}).get("piqa_local", {}).get("effective")
    return figures


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return "-" if value is None else str(value)


def one_line(metrics: dict) -> str:
    return ", ".join(f"{k} {fmt(v)}" for k, v in metrics.items() if v is not None)


def plot_stage(path: str, title: str, kind: str, records: list[dict]) -> bool:
    """One PNG with a panel per curve of the stage (x = step / iteration). False when there is nothing to plot."""
    keys = [k for k in CURVES[kind] if sum(k in r for r in records) >= 1]
    if not keys:
        return False
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in records if key in r and "step" in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("iteration" if kind in ("ppo", "grpo") else "step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(workdir: str, names: list[str], manifest: dict) -> str:
    """DIR/REPORT.md: per stage its time, product, figures table and curves PNG (DIR/plots/<stage>.png)."""
    os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
    total = sum(manifest["stages"][n].get("seconds", 0.0) for n in names)
    lines = ["# Llama 2 recipe report", "", f"{len(names)} stages, {total / 60:.1f} minutes of stage time in all "
             "(the sum over runs of this directory; a stage skipped on a re-run adds nothing).", ""]
    for name in names:
        entry = manifest["stages"][name]
        kind, stage_dir = entry.get("kind"), os.path.join(workdir, entry.get("dir", name))
        lines += [f"## {name}", "", f"Product: `{os.path.relpath(entry['output'], workdir)}`; "
                  f"{entry.get('seconds', 0.0):.0f} s.", "", "| figure | value |", "| --- | --- |"]
        lines += [f"| {k} | {fmt(v)} |" for k, v in entry["metrics"].items()]
        records = read_records(curve_file(kind, stage_dir, entry["output"])) if kind else []
        if kind and plot_stage(os.path.join(workdir, "plots", f"{name}.png"), name, kind, records):
            lines += ["", f"![{name} curves](plots/{name}.png)"]
        if kind == "rs" and os.path.isfile(os.path.join(stage_dir, "best_of_k.png")):
            lines += ["", f"![best of K]({entry.get('dir', name)}/best_of_k.png)"]
        lines.append("")
    lines += rounds_section(workdir, manifest)
    path = os.path.join(workdir, "REPORT.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def round_rows(manifest: dict) -> list[dict]:
    """One row per RLHF round (train.recipe's round_K_pairs and round_K_eval stages): the labels, each RM's accuracy
    on the round's new batch before training on it (paper Figure 6), and the round's policy on held-out prompts."""
    rows, k = [], 1
    while f"round_{k}_pairs" in manifest["stages"]:
        row = {"round": k}
        for step, keys in (("pairs", ROUND_FIGURES), ("eval", POLICY_FIGURES)):
            metrics = manifest["stages"].get(f"round_{k}_{step}", {}).get("metrics", {})
            row.update({key: metrics.get(key) for key in keys})
        rows.append(row)
        k += 1
    return rows


def rounds_section(workdir: str, manifest: dict) -> list[str]:
    """REPORT.md's "RLHF rounds" table and plots/rounds.png (proxy vs gold reward per round); [] without rounds."""
    rows = round_rows(manifest)
    if not rows:
        return []
    keys = ["round", *ROUND_FIGURES, *POLICY_FIGURES]
    about = ("Per round: the labels (new, all so far), each reward model's accuracy on the new batch before it "
             "trained on it (Figure 6), and the round's policy on held-out prompts: mean proxy reward (the round's "
             "RMs), mean gold reward (the gold annotator: the synthetic setup of Gao et al. 2023, not human labels) "
             "and its win rate over the SFT policy judged by the annotator.")
    lines = ["## RLHF rounds", "", about, "",
             "| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(fmt(row[key]) for key in keys) + " |" for row in rows]
    if plot_rounds(os.path.join(workdir, "plots", "rounds.png"), rows):
        lines += ["", "![proxy vs gold reward per round](plots/rounds.png)"]
    return lines + [""]


def plot_rounds(path: str, rows: list[dict]) -> bool:
    """Proxy and gold mean reward of each round's policy (x = round). False when no round has either."""
    series = {key: [(r["round"], r[key]) for r in rows if r.get(key) is not None]
              for key in ("proxy_helpful_mean", "gold_helpful_mean", "proxy_safety_mean", "gold_safety_mean")}
    series = {key: points for key, points in series.items() if points}
    if not series:
        return False
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for key, points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key,
                linestyle="-" if key.startswith("gold") else "--")
    ax.set_xlabel("round")
    ax.set_ylabel("mean sigmoid reward, held-out prompts")
    ax.set_title("Proxy vs gold reward per RLHF round")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
