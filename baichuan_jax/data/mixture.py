"""Sampling weights: per-language/category mixture and near-duplicate cluster down-weighting.

Every cleaned document gets a ``weight`` (read by the tokenized dataset). It is the product of

* a **mixture factor** for its group ``"<lang>/<category>"`` (e.g. ``zh/news``, ``code/code``).
  Keys of ``weights`` may use ``*`` for either part (``zh/*``, ``*/code``, ``*``); the most specific
  match wins (exact, then ``lang/*``, then ``*/category``, then ``*``).
  - ``mode = "multiplier"``: the value is the factor itself (unmatched groups use ``default``).
    Up-sampling curated data (Baichuan 2 up-samples curated positive data) is a multiplier above 1.
  - ``mode = "proportion"``: values are target shares of the *weighted characters*; the factor of
    group g is ``target_g / actual_g`` where ``actual_g`` is g's share of ``cluster_factor * chars``
    in the cleaned corpus, so sampling by weight x length reproduces the targets exactly. Every group
    in the data must match a key.
* a **cluster factor** ``max(min_cluster_weight, size ** -cluster_beta)`` where ``size`` is the size of
  the document's near-duplicate cluster (1 for unique documents). Content copied many times is
  usually a template or spam; the one copy kept stands for the cluster but is sampled less often
  (beta = 0.5: a 100-copy cluster keeps one copy at weight 0.1). With ``cluster_beta = 0`` the
  factor is 1.

    cfg = mixture.default_config(); cfg.weights = {"zh/*": 0.5, "code/code": 0.2, "*": 0.3}
    cfg.mode = "proportion"
"""

from __future__ import annotations

import ml_collections

MODES = ("multiplier", "proportion")


def default_config() -> ml_collections.ConfigDict:
  """Mixture and cluster-weight settings."""
  c = ml_collections.ConfigDict()
  # "multiplier": weights are per-group factors; "proportion": target shares of weighted characters.
  c.mode = "multiplier"
  # "<lang>/<category>" (with * wildcards) -> factor or target share. Empty: every group gets
  # `default`. Example: {"zh/reviews": 0.5, "en/*": 2.0}.
  c.weights = ml_collections.ConfigDict()
  # Factor for groups without a matching key (multiplier mode only).
  c.default = 1.0
  # Exponent of the cluster-size penalty size**-beta (0 disables it).
  c.cluster_beta = 0.5
  # Floor of the cluster factor, so no kept document becomes unsampleable.
  c.min_cluster_weight = 0.05
  return c


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Raises ValueError naming the field, its value and what is allowed."""
  if cfg.mode not in MODES:
    raise ValueError(f"mixture.mode = {cfg.mode!r} is invalid; allowed: {', '.join(MODES)}")
  for key, value in dict(cfg.weights).items():
    if key != "*" and (key.count("/") != 1 or not all(key.split("/"))):
      raise ValueError(f"mixture.weights key {key!r} is invalid; allowed: '<lang>/<category>' "
                       "with '*' wildcards, or '*'")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
      raise ValueError(f"mixture.weights[{key!r}] = {value!r} is invalid; allowed: a number >= 0")
  if cfg.mode == "proportion" and dict(cfg.weights) and sum(dict(cfg.weights).values()) <= 0:
    raise ValueError("mixture.weights in proportion mode must have a positive sum")
  if not isinstance(cfg.default, (int, float)) or cfg.default < 0:
    raise ValueError(f"mixture.default = {cfg.default!r} is invalid; allowed: a number >= 0")
  if not isinstance(cfg.cluster_beta, (int, float)) or cfg.cluster_beta < 0:
    raise ValueError(f"mixture.cluster_beta = {cfg.cluster_beta!r} is invalid; allowed: a number >= 0")
  if not isinstance(cfg.min_cluster_weight, (int, float)) or not 0 < cfg.min_cluster_weight <= 1:
    raise ValueError(f"mixture.min_cluster_weight = {cfg.min_cluster_weight!r} is invalid; "
                     "allowed: a number in (0, 1]")
  return cfg


def group(lang: str, category: str) -> str:
  """The mixture group name of a document."""
  return f"{lang}/{category}"


def lookup(weights: dict, lang: str, category: str) -> float | None:
  """Most specific matching value for (lang, category), or None."""
  for key in (f"{lang}/{category}", f"{lang}/*", f"*/{category}", "*"):
    if key in weights:
      return float(weights[key])
  return None


def cluster_factor(size: int, beta: float, floor: float) -> float:
  """``max(floor, size ** -beta)``; 1.0 for a unique document (size 1)."""
  if size <= 1 or beta == 0:
    return 1.0
  return max(floor, float(size) ** -beta)


def group_factors(cfg: ml_collections.ConfigDict, weighted_chars: dict[str, float]) -> dict[str, float]:
  """Mixture factor per group.

  Args:
    cfg: mixture config.
    weighted_chars: group -> sum over its documents of ``cluster_factor * len(text)``.
  Returns:
    group -> factor. In proportion mode the factors make each group's share of
    ``factor * weighted_chars`` equal its normalised target.
  """
  weights = dict(cfg.weights)
  out = {}
  if cfg.mode == "multiplier":
    for g in weighted_chars:
      lang, cat = g.split("/", 1)
      v = lookup(weights, lang, cat)
      out[g] = cfg.default if v is None else v
    return out
  targets = {}
  for g in weighted_chars:
    lang, cat = g.split("/", 1)
    v = lookup(weights, lang, cat)
    if v is None:
      raise ValueError(f"mixture.weights has no entry for group {g!r}; proportion mode needs one per "
                       f"group (add {g!r}, '{lang}/*', '*/{cat}' or '*')")
    targets[g] = v
  total_target = sum(targets.values())
  total_chars = sum(weighted_chars.values())
  if total_target <= 0:
    raise ValueError("mixture.weights: the targets of the groups present sum to 0")
  for g, t in targets.items():
    actual = weighted_chars[g] / total_chars if total_chars else 0.0
    out[g] = (t / total_target) / actual if actual > 0 else 0.0
  return out


def document_weight(factors: dict[str, float], lang: str, category: str, cluster_size: int,
                    beta: float, floor: float) -> float:
  """Mixture factor x cluster factor, rounded to 6 significant digits for stable JSON output.

  Args:
    factors: from ``group_factors``.
    lang, category: the document's fields.
    cluster_size: size of its near-duplicate cluster (1 if unique).
    beta, floor: ``cluster_beta`` and ``min_cluster_weight`` of the mixture config.
  """
  w = factors[group(lang, category)] * cluster_factor(cluster_size, beta, floor)
  return float(f"{w:.6g}")
