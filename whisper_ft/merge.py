"""merge_base: the fine-tuned weights averaged with the base model's (WiSE-FT, Wortsman et al. 2022).

    theta(alpha) = theta_base + alpha * (theta_fine_tuned - theta_base)

Fine-tuning on a narrow domain moves the weights far enough to forget plain speech. A point on the line
between the two models often keeps (nearly) all of the domain's gain and what the base model knew; measured
on a real whisper-tiny.en, alpha 0.3-0.5 beat both ends on every set (docs/DESIGN.md "Pitfall: forgetting").
At the end of training the loop evaluates every alpha of ALPHAS on every evaluation set and exports the one
choose() picks. Only the trainable weights move (frozen ones are equal in both models); a LoRA adapter moves
by scaling its zero-initialised B matrix alone, which scales its update B·A exactly (interpolating A too
would not: A starts random, and (A0 + a(A - A0))·aB is not a·B·A).
"""

from __future__ import annotations

from typing import Any

import torch

ALPHAS = tuple(round(0.1 * i, 1) for i in range(1, 11))  # 0.1 ... 1.0; 0 is the base model, evaluated at step 0


class Endpoints:
    """The trainable weights of the base model, kept on the CPU from setup on, and of the fine-tuned model
    once training is over: what every alpha is built from, exactly (torch.lerp is exact at 0 and 1)."""

    def __init__(self, model: torch.nn.Module):
        self.base = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
        self.tuned: dict[str, torch.Tensor] | None = None

    def set_alpha(self, model: torch.nn.Module, alpha: float) -> None:
        """Write theta(alpha) into `model` (the same parameter names as at setup; a wrapper's are unwrapped)."""
        params = dict(model.named_parameters())
        if self.tuned is None:
            self.tuned = {n: params[n].detach().to("cpu", copy=True) for n in self.base}
        with torch.no_grad():
            for name, base in self.base.items():
                tuned = self.tuned[name]
                value = tuned if ".lora_A." in name else torch.lerp(base.float(), tuned.float(), alpha)
                params[name].copy_(value.to(params[name].dtype))


def unavailable(cfg, sharded: bool) -> str:
    """Why merge_base cannot run with these settings ('' when it can): the run then exports the trained weights
    unmerged and says so at the start, rather than refusing a default."""
    if cfg.eval_strategy == "no":
        return "it picks its alpha by evaluating, and eval_strategy is no"
    if sharded:  # each alpha rewrites the whole weights, which FSDP and ZeRO-3 hold in shards
        return "it is not supported with FSDP or DeepSpeed ZeRO-3 (ZeRO-2 and plain data parallelism merge)"
    return ""


def score(row: dict[str, float], domain: str, guards: list[str], domain_weight: float) -> float:
    """The mean metric over the sets, the domain's weighted by merge_domain_weight."""
    return (domain_weight * row[domain] + sum(row[g] for g in guards)) / (domain_weight + len(guards))


def choose(table: dict[float, dict[str, float]], base: dict[str, float], domain: str, domain_weight: float = 1.0,
           max_increase: float = 1.0, greater_is_better: bool = False) -> tuple[float, str]:
    """The alpha to export and why, from {alpha: {set: metric}} and the base model's {set: metric}.

    The rule: the best mean over the sets (score()), among the alphas whose metric on every other set (the guard
    sets: general speech) is at most `max_increase` worse than the base model's there; ties go to the smaller
    alpha (closer to the base model). alpha 0, the base model itself, always qualifies when its numbers are known.
    With no guard set the domain's set alone decides.
    """
    guards = [s for s in next(iter(table.values())) if s != domain]
    sign = -1.0 if greater_is_better else 1.0  # minimise sign * metric
    candidates = dict(table)
    if all(base.get(s) is not None for s in [domain, *guards]):
        candidates.setdefault(0.0, {s: base[s] for s in [domain, *guards]})

    def within_guards(row: dict[str, float]) -> bool:
        return all(base.get(g) is None or sign * (row[g] - base[g]) <= max_increase + 1e-9 for g in guards)

    allowed = {a: row for a, row in candidates.items() if within_guards(row)}
    if not allowed:  # base numbers unknown for a guard that every alpha fails: cannot happen with alpha 0 present
        allowed = candidates
    alpha = min(allowed, key=lambda a: (sign * score(allowed[a], domain, guards, domain_weight), a))
    if not guards:
        return alpha, f"alpha {alpha:g}: the best on {domain}, the only evaluation set (add a guard set of general " \
                      "speech to eval_sets so that merging can keep what the base model knew)"
    excluded = sorted(a for a in candidates if a not in allowed)
    why = (f"alpha {alpha:g}: the best mean over the sets ({domain} weighted {domain_weight:g}) among the alphas within "
           f"{max_increase:g} of the base model on {', '.join(guards)}")
    why += f"; excluded for the guard sets: {', '.join(f'{a:g}' for a in excluded)}" if excluded else ""
    return alpha, why + ("; no merge beat the base model within those limits, so the base model is exported "
                         "unchanged" if alpha == 0 else "")


def table_rows(table: dict[float, dict[str, float]], base: dict[str, float]) -> list[dict[str, Any]]:
    """The table as metrics.jsonl and the model card keep it: one row per alpha, 0 (the base model) first."""
    rows = [{"alpha": 0.0, **base}] if base else []
    return rows + [{"alpha": a, **table[a]} for a in sorted(table)]
