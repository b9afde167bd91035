"""RLHF with PPO and four models: actor (trainable), reference (frozen), reward (frozen), critic.

Each iteration: sample responses from the actor with the KV cache; score them with the reward model;
compute actor / reference log-probabilities and critic values on the joined sequences; shape
per-token rewards with the scheduled KL penalty; GAE; then `ppo_epochs` passes of minibatch updates
of the critic and (after the critic-only warm-up) the actor. Actor and critic are trained by the
shared training step (`engine.TreeTrainer`: AdamW, global-norm clip, non-finite skipping); the frozen
models are cast to `frozen_dtype` (bf16) once. All four live on the same mesh.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from baichuan_jax import train
from baichuan_jax.align import engine, ppo, reward, rollout
from baichuan_jax.align.trainers import MetricsLog
from baichuan_jax.train import loop as train_loop

_LOG = logging.getLogger(__name__)

# Metrics logged per iteration, in plot order.
PLOT_KEYS = ("score", "kl", "kl_coef", "policy_loss", "value_loss", "clip_fraction", "entropy",
             "response_length")


def default_ppo_config() -> ml_collections.ConfigDict:
  """Baichuan 2's published PPO values (technical report) and common choices for the rest."""
  c = ml_collections.ConfigDict()
  # PPO iterations (rollout + update rounds). Baichuan 2: 350.
  c.iterations = 350
  # First iterations that update only the critic (actor frozen). Baichuan 2: 20.
  c.critic_warmup = 20
  # Learning rate of actor and critic (constant). Baichuan 2: 5e-6.
  c.lr = 5e-6
  # Global gradient-norm clip of actor and critic updates. Baichuan 2: 0.5.
  c.grad_clip = 0.5
  # AdamW weight decay for actor and critic (unpublished; 0 keeps PPO's trust region the only pull).
  c.weight_decay = 0.0
  # PPO ratio clip epsilon. Baichuan 2: 0.1.
  c.clip = 0.1
  # Value-function clip around the rollout-time values (unpublished; 0.2 as in common RLHF code).
  c.value_clip = 0.2
  # KL-penalty coefficient schedule: from kl_start at iteration 0 to kl_end at the last iteration.
  # Baichuan 2: 0.2 -> 0.005 (shape unpublished; exponential spends equal time per decade).
  c.kl_start = 0.2
  c.kl_end = 0.005
  c.kl_schedule = "exponential"
  # GAE discount and lambda (unpublished; 1.0 and 0.95 are the usual RLHF values).
  c.gamma = 1.0
  c.lam = 0.95
  # Entropy bonus weight in the actor loss (0: entropy is only reported).
  c.entropy_coef = 0.0
  # Responses sampled per iteration.
  c.rollout_batch = 16
  # Sequences per optimizer step (must divide rollout_batch).
  c.minibatch = 8
  # Passes over each rollout batch.
  c.ppo_epochs = 1
  # Prompt length after left padding / left truncation, and generated tokens per response.
  c.prompt_len = 16
  c.max_new_tokens = 24
  # Sampling temperature and top-k for rollouts (1.0 and 0: the policy's own distribution).
  c.temperature = 1.0
  c.top_k = 0
  # Storage / compute dtype of the frozen reference and reward models. Baichuan 2: bf16.
  c.frozen_dtype = "bfloat16"
  # Whiten advantages over each rollout batch.
  c.whiten_advantages = True
  # Seed of rollouts and minibatch order.
  c.seed = 0
  return c


def _engine_cfg(pc: ml_collections.ConfigDict, seq_len: int) -> ml_collections.ConfigDict:
  tc = train.default_train_config()
  tc.batch_size, tc.seq_len, tc.microbatches = pc.minibatch, seq_len, 1
  tc.peak_lr, tc.warmup_steps, tc.min_lr_ratio = pc.lr, 0, 1.0  # constant LR
  tc.total_steps = max(1, pc.iterations * pc.ppo_epochs * (pc.rollout_batch // pc.minibatch))
  tc.grad_clip, tc.weight_decay, tc.zero_stage = pc.grad_clip, pc.weight_decay, 0
  tc.loss_chunk_size = 0
  return tc


def validate_ppo_config(pc: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field for values PPO cannot run with."""
  for f in ("iterations", "rollout_batch", "minibatch", "ppo_epochs", "prompt_len",
            "max_new_tokens"):
    if not isinstance(pc[f], int) or pc[f] <= 0:
      raise ValueError(f"ppo.{f}={pc[f]!r} is invalid: must be a positive integer")
  if pc.rollout_batch % pc.minibatch:
    raise ValueError(f"ppo.minibatch={pc.minibatch} must divide ppo.rollout_batch={pc.rollout_batch}")
  if not 0 <= pc.critic_warmup <= pc.iterations:
    raise ValueError(f"ppo.critic_warmup={pc.critic_warmup} must be in [0, iterations]")
  if pc.kl_schedule not in ppo.KL_SCHEDULES:
    raise ValueError(f"ppo.kl_schedule={pc.kl_schedule!r}; allowed: {', '.join(ppo.KL_SCHEDULES)}")
  if not pc.clip > 0 or not pc.value_clip > 0 or not pc.lr > 0:
    raise ValueError("ppo.clip, ppo.value_clip and ppo.lr must be > 0")


class PPOTrainer:
  """Holds the four models and runs PPO iterations.

  Args:
    model_cfg: model config shared by the four models (fp32 master weights for the trainable two).
    pc: `default_ppo_config()`-shaped config.
    mesh: device mesh.
    actor: policy parameters (the reference starts as a frozen copy unless `reference` is given).
    reward_params: trained reward model (`reward.init_reward_params` tree).
    critic: value-model parameters; default: a copy of the reward model (InstructGPT).
    eos_id, pad_id: token ids.
  """

  def __init__(self, model_cfg, pc, mesh, actor: Any, reward_params: Any,
               critic: Optional[Any] = None, reference: Optional[Any] = None,
               eos_id: int = 2, pad_id: int = 0):
    validate_ppo_config(pc)
    self.cfg, self.pc, self.eos_id, self.pad_id = model_cfg, pc, eos_id, pad_id
    frozen_cfg = model_cfg.copy_and_resolve_references()
    frozen_cfg.dtype = pc.frozen_dtype
    self.reference = rollout.to_dtype(reference if reference is not None else actor, pc.frozen_dtype)
    self.reward = rollout.to_dtype(reward_params, pc.frozen_dtype)
    critic = critic if critic is not None else jax.tree.map(jnp.array, reward_params)
    r_len, self.resp_len = pc.prompt_len + pc.max_new_tokens, pc.max_new_tokens
    tc = _engine_cfg(pc, r_len)
    self.actor = engine.ModelTrainer(actor, model_cfg, tc, mesh, self._actor_loss(), seed=pc.seed)
    self.critic = engine.TreeTrainer(critic, engine.value_model_axes(model_cfg), tc, mesh,
                                     self._critic_loss(), seed=pc.seed + 1)
    R = self.resp_len
    def evaluate(actor_p, ref_p, critic_p, t, s, q):
      # One jit for the three per-token passes over a rollout batch (one compile, not three).
      logp, ent = rollout.policy_outputs(model_cfg, actor_p, t, s, q, R)
      ref_logp = rollout.policy_outputs(frozen_cfg, ref_p, t, s, q, R)[0]
      return logp, ent, ref_logp, rollout.critic_values(model_cfg, critic_p, t, s, q, R)

    self._evaluate = jax.jit(evaluate)
    self._score = jax.jit(lambda p, t, m: reward.sequence_rewards(frozen_cfg, p, t, m))
    self._rng = np.random.default_rng(pc.seed)

  def _actor_loss(self):
    cfg, pc = self.cfg, self.pc

    def loss_fn(params, b, rng):
      del rng
      logp, ent = rollout.policy_outputs(cfg, params, b["tokens"], b["seg"], b["positions"],
                                         b["old_logp"].shape[1])
      out = ppo.policy_loss(logp, b["old_logp"], b["advantages"], b["resp_mask"], pc.clip)
      out["entropy"] = ppo.masked_mean(ent, b["resp_mask"])
      out["loss"] = out["policy_loss"] - pc.entropy_coef * out["entropy"]
      out["weight"] = jnp.sum(b["resp_mask"]).astype(jnp.float32)
      return out["loss"], out

    return loss_fn

  def _critic_loss(self):
    cfg, pc = self.cfg, self.pc

    def loss_fn(params, b, rng, frozen):
      del rng, frozen
      v = rollout.critic_values(cfg, params, b["tokens"], b["seg"], b["positions"],
                                b["old_values"].shape[1])
      out = ppo.value_loss(v, b["old_values"], b["returns"], b["resp_mask"], pc.value_clip)
      out["loss"] = out["value_loss"]
      out["weight"] = jnp.sum(b["resp_mask"]).astype(jnp.float32)
      return out["loss"], out

    return loss_fn

  def generate(self, prompts: Sequence[Sequence[int]], params: Optional[Any] = None,
               seed: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Samples responses for token-id prompts (left-truncated to prompt_len) with the actor.

    Returns:
      (prompts [B, prompt_len] left-padded, prompt_mask, response [B, R], resp_mask [B, R]).
    """
    pl = self.pc.prompt_len
    prompts = [list(p)[-pl:] for p in prompts]
    toks, mask = rollout.left_pad(prompts, self.pad_id, pl)
    if seed is None:
      seed = int(self._rng.integers(2**31 - len(prompts)))
    resp, rmask = rollout.generate_responses(
        self.cfg, self.actor.params if params is None else params, prompts, self.resp_len,
        temperature=self.pc.temperature, top_k=self.pc.top_k, seed=seed, eos_id=self.eos_id,
        pad_id=self.pad_id)
    return toks, mask, resp, rmask

  def score(self, toks, mask, resp, rmask) -> np.ndarray:
    """Reward-model scores [batch] of prompt + response."""
    t, m = rollout.reward_inputs(toks, mask, resp, rmask, self.eos_id, self.pad_id)
    return np.asarray(self._score(self.reward, t, m))

  def iteration(self, it: int, prompts: Sequence[Sequence[int]]) -> dict:
    """One PPO iteration on `rollout_batch` prompts; returns its metrics."""
    pc, R = self.pc, self.resp_len
    t0 = time.perf_counter()
    toks, mask, resp, rmask = self.generate(prompts)
    score = self.score(toks, mask, resp, rmask)
    tokens, seg, pos = (np.asarray(x) for x in rollout.joined(toks, mask, resp, rmask))
    old_logp, ent, ref_logp, values = self._evaluate(self.actor.params, self.reference,
                                                     self.critic.params, tokens, seg, pos)
    kl_coef = float(ppo.kl_coefficient(it, pc.iterations, pc.kl_start, pc.kl_end, pc.kl_schedule))
    rewards, kl = ppo.shaped_rewards(jnp.asarray(score), old_logp, ref_logp, rmask, kl_coef)
    adv, returns = ppo.gae(rewards, values, rmask, pc.gamma, pc.lam)
    if pc.whiten_advantages:
      adv = ppo.whiten(adv, rmask) * rmask
    data = {"tokens": tokens, "seg": seg, "positions": pos, "resp_mask": rmask,
            "old_logp": np.asarray(old_logp), "advantages": np.asarray(adv),
            "old_values": np.asarray(values), "returns": np.asarray(returns)}
    actor_m, critic_m = [], []
    train_actor = it >= pc.critic_warmup
    for _ in range(pc.ppo_epochs):
      order = self._rng.permutation(pc.rollout_batch)
      for i in range(0, pc.rollout_batch, pc.minibatch):
        mb = {k: v[order[i:i + pc.minibatch]] for k, v in data.items()}
        critic_m.append(self.critic.step(mb))
        if train_actor:
          actor_m.append(self.actor.step(mb))
    mean = lambda ms, k: float(np.mean([float(m[k]) for m in ms])) if ms else float("nan")  # noqa: E731
    m = np.asarray(rmask, np.float32)
    return {
        "iteration": it, "score": float(score.mean()), "score_std": float(score.std()),
        "kl": float(np.mean(np.sum(np.asarray(kl), axis=1))), "kl_coef": kl_coef,
        "policy_loss": mean(actor_m, "policy_loss"), "clip_fraction": mean(actor_m, "clip_fraction"),
        "approx_kl": mean(actor_m, "approx_kl"), "value_loss": mean(critic_m, "value_loss"),
        "entropy": float((np.asarray(ent) * m).sum() / m.sum()),
        "response_length": float(m.sum(1).mean()), "actor_updated": float(train_actor),
        "seconds": time.perf_counter() - t0,
    }

  def run(self, prompt_source: Callable[[int], Sequence[Sequence[int]]],
          log_path: Optional[str] = None, iterations: Optional[int] = None) -> list[dict]:
    """Runs `iterations` (default pc.iterations) PPO iterations; metrics go to `log_path` (JSONL).

    Args:
      prompt_source: `f(n) -> n prompts` (lists of token ids).
    """
    log = MetricsLog(log_path)
    n = self.pc.iterations if iterations is None else iterations
    # One PPO iteration is one step of the one loop: the "state" is the iteration index, the
    # "batch" the iteration's prompts, and the step's metrics its row.
    step = lambda it, prompts: (it + 1, self.iteration(it, prompts))  # noqa: E731
    loop = train_loop.Loop(step, 0, (prompt_source(self.pc.rollout_batch) for _ in range(n)), n)
    bar = tqdm.tqdm(total=n, desc="ppo", unit="it")

    def write(info: train_loop.StepInfo) -> None:
      log.write(info.metrics)
      bar.update(1)
      bar.set_postfix(score=f"{info.metrics['score']:.2f}", kl=f"{info.metrics['kl']:.2f}")

    loop.add_hook(write)
    try:
      loop.run()
    finally:
      bar.close()
    return log.rows


def plot_metrics(rows: Sequence[dict], keys: Sequence[str], path: str, x: str = "iteration",
                 title: str = "", vline: Optional[float] = None) -> None:
  """One small panel per metric against `x`, saved as PNG (`vline`: a dashed marker, e.g. the end
  of the critic warm-up)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  keys = [k for k in keys if any(k in r for r in rows)]
  cols = min(4, len(keys))
  nrows = (len(keys) + cols - 1) // cols
  fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.8 * nrows), squeeze=False)
  for ax, k in zip(axes.flat, keys):
    pts = [(r[x], r[k]) for r in rows if k in r and np.isfinite(r[k])]
    if pts:
      xs, ys = (np.asarray(v, np.float64) for v in zip(*pts))
      ax.plot(xs, ys, lw=0.8, alpha=0.45 if len(ys) > 40 else 1.0)
      if len(ys) > 40:  # noisy per-iteration values: overlay a moving average
        w = max(5, len(ys) // 25)
        smooth = np.convolve(ys, np.ones(w) / w, mode="valid")
        ax.plot(xs[w - 1:], smooth, lw=1.6, color="C3", label=f"mean of {w}")
        ax.legend(fontsize=6, loc="best")
    if vline is not None:
      ax.axvline(vline, color="grey", ls="--", lw=0.8)
    ax.set_title(k, fontsize=9)
    ax.set_xlabel(x, fontsize=8)
    ax.tick_params(labelsize=7)
  for ax in list(axes.flat)[len(keys):]:
    ax.axis("off")
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
