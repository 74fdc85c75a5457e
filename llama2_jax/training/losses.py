"""Loss functions with the contract of `llama2_jax.training.state.train_step`.

A loss function has the signature `loss_fn(params, batch) -> (loss_sum, aux)`:
  - `loss_sum`: scalar float32, the loss *summed* over the batch's units (tokens, pairs, …);
  - `aux`: dict of scalars; `aux["weight"]` is the number of units in `loss_sum` (tokens with loss_mask 1, pairs, …);
    every other entry is also a sum over the same units, reported divided by the total weight.
Summing makes gradient accumulation and data parallelism exact: the step divides by the global weight once.

The losses: `next_token_loss` (pretraining, SFT), `pairwise_loss` (reward models: `ranking_loss` with the margin
`margin_for`), `ppo_policy_loss` and `ppo_value_loss` (PPO; `sequence_logprobs` gives the log-probabilities both the
rollout and the policy loss use), `dpo_loss` (DPO, IPO, SLiC-HF), `grpo_loss` and `rloo_loss` (critic-free RL; their
pure cores `grpo_objective` and `rloo_objective` take per-token log-probabilities).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llama2_jax.rlhf import formulas as rlhf

Array = jax.Array


def token_cross_entropy(logits: Array, targets: Array) -> Array:
    """Per-token -log p(target). logits [B, T, V] (any float dtype, computed in float32), targets [B, T] -> [B, T]."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    # A one-hot select rather than take_along_axis: its gradient is an elementwise select fused into the softmax
    # gradient, not a scatter into a zeroed [B, T, V] buffer (~0.15 s of a 5 s CPU step at V = 32000).
    is_target = jnp.arange(logits.shape[-1], dtype=jnp.int32) == targets[..., None].astype(jnp.int32)
    target_logit = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
    return log_z - target_logit


def next_token_loss(params, batch: dict, *, model) -> tuple[Array, dict]:
    """Masked next-token cross-entropy for pretraining and SFT.

    batch: `inputs`, `targets`, `segment_ids`, `positions` int32 [B, T]; `loss_mask` float32 [B, T]
    (1 where the target is supervised: a real next token of the same document; for SFT, assistant tokens only).
    """
    logits = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                         segment_ids=batch["segment_ids"])
    mask = batch["loss_mask"].astype(jnp.float32)
    nll = token_cross_entropy(logits, batch["targets"]) * mask
    correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32) * mask
    weight = jnp.sum(mask)
    return jnp.sum(nll), {"weight": weight, "loss": jnp.sum(nll), "accuracy": jnp.sum(correct)}


# Margin m(rating) of the ranking loss, Llama 2 paper Table 27. Rating order: significantly better, better,
# slightly better, negligibly better / unsure (index 0..3; the pair batches carry this index as `rating`).
RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")
MARGIN_TABLES = {
    "none": (0.0, 0.0, 0.0, 0.0),
    "small": (1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0),
    "large": (3.0, 2.0, 1.0, 0.0),
}


def margin_for(rating_index: Array, table: str) -> Array:
    """m(rating) for an int array of rating indices (-1 = no rating: margin 0)."""
    if table not in MARGIN_TABLES:
        raise ValueError(f"unknown margin table {table!r}; known: {', '.join(MARGIN_TABLES)}")
    values = jnp.asarray(MARGIN_TABLES[table] + (0.0,), jnp.float32)  # index -1 -> the trailing 0
    return values[rating_index]


# ----------------------------------------------------------------------------------------------------------------------
# Reward model: the pairwise ranking loss (paper section 3.2.2, Eq. 2)

RATING_LEVELS = RATINGS + ("unrated",)  # per-level metrics; "unrated" = rating index -1 (HH, OASST: every pair)


def pair_scores(params, batch: dict, model) -> tuple[Array, Array]:
    """(r_chosen [P], r_rejected [P]): one forward pass over the 2P sequences of a pair batch (see data/rm.py).
    `model.apply({"params": p}, tokens [N, T], lengths [N]) -> [N]` (a `score_model.ScoreModel`)."""
    tokens = batch["tokens"]
    n_pairs, _, length = tokens.shape
    scores = model.apply({"params": params}, tokens.reshape(2 * n_pairs, length),
                         batch["lengths"].reshape(2 * n_pairs))
    scores = scores.reshape(n_pairs, 2)
    return scores[:, 0], scores[:, 1]


def pairwise_loss(params, batch: dict, *, model, margin_table: str = "none") -> tuple[Array, dict]:
    """Binary ranking loss with margin, -log sigma(r_c - r_r - m(rating)) (paper Eq. 2): (sum over pairs, aux of
    sums), aux["weight"] = number of real pairs.

    batch: tokens [P, 2, T], lengths [P, 2], rating [P] (-1 = none: margin 0), optional valid [P] (0 = padding pair).
    aux (all sums over pairs): "accuracy" (r_c > r_r; a tie counts as wrong), "margin" (r_c - r_r),
    "score_chosen"/"score_rejected" (raw scores), and per rating level L in RATING_LEVELS "n_L" (pairs at that level)
    and "correct_L" (of those, ranked right). The loop divides every entry by the total weight, so per-level accuracy
    is correct_L / n_L of the same record (`per_rating_accuracy`).
    """
    r_chosen, r_rejected = pair_scores(params, batch, model)
    rating = batch["rating"].astype(jnp.int32)
    valid = batch.get("valid", jnp.ones_like(r_chosen)).astype(jnp.float32)
    per_pair = ranking_loss(r_chosen, r_rejected, margin_for(rating, margin_table)) * valid
    correct = (r_chosen > r_rejected).astype(jnp.float32) * valid
    aux = {"weight": jnp.sum(valid), "accuracy": jnp.sum(correct), "margin": jnp.sum((r_chosen - r_rejected) * valid),
           "score_chosen": jnp.sum(r_chosen * valid), "score_rejected": jnp.sum(r_rejected * valid)}
    for index, level in enumerate(RATING_LEVELS):
        in_level = (rating == (index if index < len(RATINGS) else -1)).astype(jnp.float32) * valid
        aux[f"n_{level}"] = jnp.sum(in_level)
        aux[f"correct_{level}"] = jnp.sum(correct * in_level)
    return jnp.sum(per_pair), aux


def per_rating_accuracy(metrics: dict[str, float], prefix: str = "") -> dict[str, float]:
    """{f"{prefix}accuracy_{L}": correct_L / n_L} for the levels present in a metrics record of `pairwise_loss`
    (sums or means over the same weight). Levels with no pairs are left out."""
    out = {}
    for level in RATING_LEVELS:
        n = metrics.get(f"{prefix}n_{level}", 0.0)
        if n > 0:
            out[f"{prefix}accuracy_{level}"] = metrics[f"{prefix}correct_{level}"] / n
    return out


# ----------------------------------------------------------------------------------------------------------------------
# PPO (paper section 3.2.3): the clipped surrogate of the policy and the clipped value loss, summed over actions.
# batch: ids [B, S + 1] (prompt + response + EOS slot), mask [B, S] (1 where ids[:, j + 1] is an action) and the
# rollout's logprobs / values / advantages / returns [B, S] (see llama2_jax/rlhf/rollout.py).


def sequence_logprobs(params, ids: Array, *, model, temperature: float = 1.0) -> tuple[Array, Array]:
    """ids [B, S + 1] -> (log pi(ids[:, j + 1] | ids[:, :j + 1]) [B, S], entropy [B, S]) under softmax(logits / T),
    the distribution the sampler draws from. `model` is a `Llama`."""
    logits = model.apply({"params": params}, ids[:, :-1]).astype(jnp.float32) / temperature
    return -token_cross_entropy(logits, ids[:, 1:]), rlhf.entropy(logits)


def ppo_policy_loss(params, batch: dict, *, model, temperature: float, clip_ratio: float) -> tuple[Array, dict]:
    """Clipped surrogate (`rlhf.policy_objective`) summed over the action tokens; aux: weight (actions), clipfrac,
    entropy and approx_kl sums."""
    logprobs, ent = sequence_logprobs(params, batch["ids"], model=model, temperature=temperature)
    mask = batch["mask"]
    loss, clipped = rlhf.policy_objective(logprobs, batch["logprobs"], batch["advantages"], clip_ratio)
    total = lambda x: jnp.sum(x * mask)  # noqa: E731
    return total(loss), {"weight": jnp.sum(mask), "clipfrac": total(clipped), "entropy": total(ent),
                         "approx_kl": total(rlhf.approx_kl(logprobs, batch["logprobs"]))}


def ppo_value_loss(params, batch: dict, *, model, clip_value: float) -> tuple[Array, dict]:
    """TRL's clipped value loss (`rlhf.value_objective`) summed over the action tokens. `model` is a
    `score_model.ScoreModel` read at every position: the value of action j is the head at position j."""
    values = model.apply({"params": params}, batch["ids"])[:, :-1]
    mask = batch["mask"]
    loss, clipped = rlhf.value_objective(values, batch["values"], batch["returns"], clip_value)
    return jnp.sum(loss * mask), {"weight": jnp.sum(mask), "clipfrac": jnp.sum(clipped * mask)}


def ranking_loss(r_chosen: Array, r_rejected: Array, margin: Array) -> Array:
    """Per-pair binary ranking loss with margin, -log sigma(r_c - r_r - m) (paper Eq. 2). Shapes [P] -> [P]."""
    return -jax.nn.log_sigmoid(r_chosen.astype(jnp.float32) - r_rejected.astype(jnp.float32) - margin)


# ----------------------------------------------------------------------------------------------------------------------
# Direct preference optimisation (Rafailov et al. 2023) and two variants of its per-pair loss.
#
# With h = [log pi(y_c|x) - log ref(y_c|x)] - [log pi(y_r|x) - log ref(y_r|x)] (sequence log-probabilities of the
# response tokens only):
#   sigmoid  -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)    DPO, Eq. 7; eps > 0 is conservative DPO
#   ipo      (h - 1 / (2 beta))^2, log-probabilities averaged over the response tokens    IPO, Azar et al. 2023
#   hinge    max(0, 1 - beta h)                                       SLiC-HF, Zhao et al. 2023
# The implicit rewards beta * (log pi - log ref) of the chosen and the rejected response are what the trainer logs.
# These match TRL's DPOTrainer ("sigmoid", "ipo" with per-token averaging, "hinge").

DPO_LOSSES = ("sigmoid", "ipo", "hinge")


def preference_loss(h: Array, beta: float, loss_type: str, label_smoothing: float = 0.0) -> Array:
    """Per-pair loss of the log-ratio difference h [P] (see above) -> [P] float32."""
    h = h.astype(jnp.float32)
    if loss_type == "sigmoid":
        return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - label_smoothing * jax.nn.log_sigmoid(-beta * h)
    if loss_type == "ipo":
        return jnp.square(h - 1.0 / (2.0 * beta))
    if loss_type == "hinge":
        return jax.nn.relu(1.0 - beta * h)
    raise ValueError(f"unknown DPO loss {loss_type!r}; known: {', '.join(DPO_LOSSES)}")


def response_logprobs(logits: Array, tokens: Array, prompt_lens: Array, lengths: Array) -> tuple[Array, Array]:
    """Summed log-probabilities of each sequence's response tokens, and how many there are.

    logits [N, T-1, V] of inputs tokens[:, :-1]; tokens [N, T]; prompt_lens, lengths [N]: token j (1 <= j < T) is
    scored when prompt_len <= j < length. Returns (logp [N] float32, n_tokens [N] float32)."""
    targets = tokens[:, 1:]
    index = jnp.arange(1, tokens.shape[1], dtype=jnp.int32)[None, :]
    mask = ((index >= prompt_lens[:, None]) & (index < lengths[:, None])).astype(jnp.float32)
    return -jnp.sum(token_cross_entropy(logits, targets) * mask, axis=-1), jnp.sum(mask, axis=-1)


def dpo_from_logprobs(policy: Array, reference: Array, n_tokens: Array, valid: Array, *, beta: float,
                      loss_type: str, label_smoothing: float = 0.0) -> tuple[Array, dict]:
    """The DPO family's loss with the contract above, from sequence log-probs [P, 2] ([:, 0] chosen, [:, 1]
    rejected) of the policy and the (gradient-free) reference, response token counts [P, 2] and valid [P]."""
    reference = jax.lax.stop_gradient(reference)
    if loss_type == "ipo":
        count = jnp.maximum(n_tokens, 1.0)
        policy, reference = policy / count, reference / count
    log_ratio = policy - reference  # [P, 2]
    h = log_ratio[:, 0] - log_ratio[:, 1]
    per_pair = preference_loss(h, beta, loss_type, label_smoothing) * valid
    rewards = jax.lax.stop_gradient(beta * log_ratio)
    aux = {"weight": jnp.sum(valid),
           "rewards_chosen": jnp.sum(rewards[:, 0] * valid),
           "rewards_rejected": jnp.sum(rewards[:, 1] * valid),
           "reward_accuracy": jnp.sum((rewards[:, 0] > rewards[:, 1]).astype(jnp.float32) * valid),
           "reward_margin": jnp.sum((rewards[:, 0] - rewards[:, 1]) * valid),
           "logps_chosen": jnp.sum(jax.lax.stop_gradient(policy[:, 0]) * valid),
           "logps_rejected": jnp.sum(jax.lax.stop_gradient(policy[:, 1]) * valid)}
    return jnp.sum(per_pair), aux


def dpo_loss(params, batch: dict, frozen, *, model, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[Array, dict]:
    """DPO on a pair batch: the policy is `model` with `params`, the reference the same model with `frozen` params.

    batch: tokens int32 [P, 2, T] (prompt + chosen, prompt + rejected, right-padded), lengths [P, 2], prompt_lens
    [P, 2] (tokens before the response), optional valid [P]. The chosen and rejected rows go through each model in one
    forward pass of 2P rows; the reference's log-probs are computed once and never differentiated."""
    tokens = batch["tokens"]
    n_pairs, _, length = tokens.shape
    flat = tokens.reshape(2 * n_pairs, length)
    prompt_lens, lengths = batch["prompt_lens"].reshape(-1), batch["lengths"].reshape(-1)

    def logprobs(variables):
        logits = model.apply({"params": variables}, flat[:, :-1])
        return response_logprobs(logits, flat, prompt_lens, lengths)

    policy, n_tokens = logprobs(params)
    reference, _ = logprobs(jax.lax.stop_gradient(frozen))
    valid = batch.get("valid", jnp.ones((n_pairs,), jnp.float32)).astype(jnp.float32)
    return dpo_from_logprobs(policy.reshape(n_pairs, 2), reference.reshape(n_pairs, 2), n_tokens.reshape(n_pairs, 2),
                             valid, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)


def token_logprobs(logits: Array, targets: Array) -> Array:
    """log softmax(logits)[target]: logits [..., V] float32, targets [...] int -> [...] float32."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


# ----------------------------------------------------------------------------------------------------------------------
# Critic-free RL: GRPO (Shao et al. 2024, DeepSeekMath, section 4.1) and RLOO (Ahmadian et al. 2024).
#
# Shapes: B sampled completions (G per prompt, see llama2_jax/rlhf/group.py for the advantages [B]), T action
# positions; logprobs / old_logprobs / ref_logprobs are per-action log-probabilities [B, T] under the policy being
# optimised, the behaviour policy that sampled the batch, and the frozen reference; `mask` [B, T] is 1.0 on actions;
# `valid` [B] is 0.0 for padding rows (their mask is 0 too). The formulas are those of TRL's trainers
# (huggingface/trl, trl/trainer/grpo_trainer.py `GRPOTrainer._compute_loss` and trl/trainer/rloo_trainer.py
# `RLOOTrainer._compute_loss`), checked against hand-computed values in tests/rlhf/test_grpo.py.
#
# GRPO per action token t of completion i (ρ = π/π_old, the importance ratio against the behaviour policy: 1 on the
# first optimisation step of a batch, not after it):
#   ℓ_it = -min(ρ_it A_i, clip(ρ_it, 1 - ε_low, 1 + ε_high) A_i) + β k3_it,
#   k3_it = π_ref/π - log(π_ref/π) - 1  (DeepSeekMath Eq. 4; Schulman 2020's unbiased, non-negative KL estimator).
# Aggregation of ℓ into the loss (the `weight` of the loss contract above):
#   "token"     Σ_it ℓ / Σ_it mask  — every token counts once (DAPO, Yu et al. 2025, section 3.3; TRL "dapo", and
#               "bnpo" when a step is one micro-batch on one device). The default: unbiased in the completion length.
#   "sequence"  Σ_i (Σ_t ℓ_it / |o_i|) / B — DeepSeekMath Eq. 3's 1/|o_i| (TRL "grpo"). Dr. GRPO (Liu et al. 2025,
#               section 3.1) shows the 1/|o_i| favours short correct answers and long wrong ones (a wrong answer's
#               per-token penalty shrinks as it grows), which is why it is not the default.
#   "constant"  Σ_it ℓ / (B · max_completion_length) — Dr. GRPO's own fix (TRL "dr_grpo").
# With accumulation or data parallelism the loop divides by the global weight, so each is exact over the whole step.

GRPO_AGGREGATIONS = ("token", "sequence", "constant")
GRPO_CLIP = 0.2  # ε of DeepSeekMath and TRL (epsilon); DAPO's clip-higher sets ε_high = 0.28


def k3_kl(logprobs: Array, ref_logprobs: Array) -> Array:
    """Per-token k3 KL estimate exp(r) - r - 1 with r = log π_ref - log π (>= 0). [B, T] -> [B, T]."""
    log_ratio = ref_logprobs - logprobs
    return jnp.exp(log_ratio) - log_ratio - 1.0


def clipped_surrogate(ratio: Array, advantages: Array, clip_low: float, clip_high: float
                      ) -> tuple[Array, Array, Array]:
    """-min(ρA, clip(ρ, 1 - ε_low, 1 + ε_high)A) and where the clip takes the gradient away, TRL's two regions:
    low (ρ < 1 - ε_low and A < 0) and high (ρ > 1 + ε_high and A > 0). Shapes broadcast: [B, T] or [B]."""
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = -jnp.minimum(ratio * advantages, clipped * advantages)
    low = ((ratio < 1.0 - clip_low) & (advantages < 0)).astype(jnp.float32)
    high = ((ratio > 1.0 + clip_high) & (advantages > 0)).astype(jnp.float32)
    return loss, low, high


def aggregate_tokens(per_token: Array, mask: Array, valid: Array, aggregation: str,
                     max_completion_length: int | None = None) -> tuple[Array, Array]:
    """(loss_sum, weight) of per-token losses [B, T] under `aggregation` (see above); mask [B, T], valid [B]."""
    if aggregation == "token":
        return jnp.sum(per_token * mask), jnp.sum(mask)
    if aggregation == "sequence":
        per_sequence = jnp.sum(per_token * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
        return jnp.sum(per_sequence * valid), jnp.sum(valid)
    if aggregation == "constant":
        if not max_completion_length or max_completion_length < 1:
            raise ValueError(f"aggregation='constant' needs max_completion_length >= 1, got {max_completion_length!r}")
        return jnp.sum(per_token * mask), jnp.sum(valid) * float(max_completion_length)
    raise ValueError(f"unknown GRPO aggregation {aggregation!r}; known: {', '.join(GRPO_AGGREGATIONS)}")


def grpo_objective(logprobs: Array, old_logprobs: Array, advantages: Array, mask: Array,
                   ref_logprobs: Array | None = None, *, beta: float, clip_low: float = GRPO_CLIP,
                   clip_high: float | None = None, aggregation: str = "token", max_completion_length: int | None = None,
                   valid: Array | None = None) -> tuple[Array, dict]:
    """GRPO's loss with the contract above from per-token log-probs [B, T] and advantages [B].

    old_logprobs (behaviour policy) and ref_logprobs are constants: wrapped in stop_gradient. beta == 0 drops the KL
    term and ref_logprobs may be None (the caller then keeps no reference model); beta > 0 needs them.
    aux: weight (see aggregation), and sums over action tokens — "tokens", "kl" (k3), "ratio", "clip_low",
    "clip_high", "clipfrac" (either region) — plus "sequences"; divide the token sums by "tokens" for per-token
    means (`per_token_means`), whatever the aggregation."""
    if beta < 0:
        raise ValueError(f"GRPO beta must be >= 0, got {beta}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("GRPO with beta > 0 needs the reference model's ref_logprobs")
    clip_high = clip_low if clip_high is None else clip_high
    valid = jnp.ones(mask.shape[:1], jnp.float32) if valid is None else valid.astype(jnp.float32)
    mask = mask.astype(jnp.float32) * valid[:, None]
    ratio = jnp.exp(logprobs - jax.lax.stop_gradient(old_logprobs))
    per_token, low, high = clipped_surrogate(ratio, advantages[:, None].astype(jnp.float32), clip_low, clip_high)
    aux = {}
    if beta > 0:
        kl = k3_kl(logprobs, jax.lax.stop_gradient(ref_logprobs))
        per_token = per_token + beta * kl
        aux["kl"] = jnp.sum(jax.lax.stop_gradient(kl) * mask)
    loss_sum, weight = aggregate_tokens(per_token, mask, valid, aggregation, max_completion_length)
    token_sum = lambda x: jnp.sum(jax.lax.stop_gradient(x) * mask)
    aux.update(weight=weight, tokens=jnp.sum(mask), sequences=jnp.sum(valid), ratio=token_sum(ratio),
               clip_low=token_sum(low), clip_high=token_sum(high), clipfrac=token_sum(jnp.maximum(low, high)))
    return loss_sum, aux


TOKEN_METRICS = ("kl", "ratio", "clip_low", "clip_high", "clipfrac", "entropy")


def per_token_means(metrics: dict[str, float]) -> dict[str, float]:
    """{name: metrics[name] / metrics["tokens"]} for the token sums of `grpo_objective` / `grpo_loss` present in a
    metrics record (sums, or means over any one weight)."""
    tokens = metrics.get("tokens", 0.0)
    return {name: metrics[name] / tokens for name in TOKEN_METRICS if name in metrics and tokens > 0}


def grpo_loss(params, batch: dict, *, model, temperature: float, beta: float, clip_low: float = GRPO_CLIP,
              clip_high: float | None = None, aggregation: str = "token", max_completion_length: int | None = None
              ) -> tuple[Array, dict]:
    """`grpo_objective` on a rollout batch: ids [B, S + 1], mask [B, S] (actions, as in PPO: position j is the token
    ids[:, j + 1]), logprobs [B, S] (behaviour policy, under the same temperature), advantages [B], ref_logprobs
    [B, S] (only when beta > 0: computed once per batch with the frozen reference), optional valid [B]."""
    logprobs, ent = sequence_logprobs(params, batch["ids"], model=model, temperature=temperature)
    loss_sum, aux = grpo_objective(logprobs, batch["logprobs"], batch["advantages"], batch["mask"],
                                   batch.get("ref_logprobs"), beta=beta, clip_low=clip_low, clip_high=clip_high,
                                   aggregation=aggregation, max_completion_length=max_completion_length,
                                   valid=batch.get("valid"))
    mask = batch["mask"] * (batch["valid"][:, None] if "valid" in batch else 1.0)
    aux["entropy"] = jnp.sum(jax.lax.stop_gradient(ent) * mask)
    return loss_sum, aux


# RLOO as in TRL's RLOOTrainer: the KL to the reference is in the reward (`rlhf.group.rloo_rewards`), the advantage is
# the reward minus the mean of the other G - 1 completions of the prompt, and the loss is per sequence with the
# sequence's importance ratio ρ_i = π(o_i)/π_old(o_i):  ℓ_i = -min(ρ_i A_i, clip(ρ_i, 1 - ε_low, 1 + ε_high) A_i),
# averaged over sequences. On the first step of a batch (ρ = 1) its gradient is REINFORCE's -A_i ∇ log π(o_i | q)
# (Ahmadian et al. 2024, arXiv:2402.14740).


def rloo_objective(logprobs: Array, old_logprobs: Array, advantages: Array, mask: Array, *,
                   clip_low: float = GRPO_CLIP, clip_high: float | None = None, valid: Array | None = None
                   ) -> tuple[Array, dict]:
    """RLOO's loss with the contract above: (sum over sequences, aux), aux["weight"] = sequences. logprobs,
    old_logprobs, mask [B, T]; advantages, valid [B]. aux (sums over sequences): "ratio", "clip_low", "clip_high",
    "clipfrac"."""
    clip_high = clip_low if clip_high is None else clip_high
    valid = jnp.ones(mask.shape[:1], jnp.float32) if valid is None else valid.astype(jnp.float32)
    mask = mask.astype(jnp.float32) * valid[:, None]
    log_ratio = jnp.sum((logprobs - jax.lax.stop_gradient(old_logprobs)) * mask, axis=1)
    ratio = jnp.exp(log_ratio)
    per_sequence, low, high = clipped_surrogate(ratio, advantages.astype(jnp.float32), clip_low, clip_high)
    total = lambda x: jnp.sum(jax.lax.stop_gradient(x) * valid)
    return jnp.sum(per_sequence * valid), {"weight": jnp.sum(valid), "ratio": total(ratio), "clip_low": total(low),
                                           "clip_high": total(high), "clipfrac": total(jnp.maximum(low, high))}


def rloo_loss(params, batch: dict, *, model, temperature: float, clip_low: float = GRPO_CLIP,
              clip_high: float | None = None) -> tuple[Array, dict]:
    """`rloo_objective` on a rollout batch (keys as in `grpo_loss`, no ref_logprobs: RLOO's KL is in the reward)."""
    logprobs, _ = sequence_logprobs(params, batch["ids"], model=model, temperature=temperature)
    return rloo_objective(logprobs, batch["logprobs"], batch["advantages"], batch["mask"], clip_low=clip_low,
                          clip_high=clip_high, valid=batch.get("valid"))
