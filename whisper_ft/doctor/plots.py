"""The report's PNG plots (matplotlib, drawn off-screen): durations, speaking rate, per-sample scores."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: a server, a container, a CI job
    import matplotlib.pyplot as plt

    return plt


def draw(samples: list[dict], rate_limits: dict, out: Path) -> list[str]:
    """Write the plots into out; return their file names (none without matplotlib: the report says so)."""
    try:
        plt = _pyplot()
    except ImportError:
        return []
    written = []
    splits = sorted({x["split"] for x in samples}, key=lambda s: (s != "train", s))

    def by_split(field):
        return {s: [x[field] for x in samples if x["split"] == s and x.get(field) is not None] for s in splits}

    for name, field, xlabel, limits in (("durations.png", "seconds", "duration (s)", None),
                                        ("speaking_rate.png", "chars_per_second", "characters per second",
                                         rate_limits)):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        values = by_split(field)
        for split, v in values.items():
            if v:
                ax.hist(v, bins=min(40, max(5, len(v) // 3)), alpha=0.6, label=f"{split} ({len(v)})")
        for limit in (limits or {}).values():
            if limit:
                ax.axvline(limit, color="red", linestyle="--", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("samples")
        if any(values.values()):
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(name)

    scored = [x for x in samples if x.get("scores")]
    if scored:
        fig, ax = plt.subplots(figsize=(7, 4))
        flagged = [x for x in scored if any(r == "transcript does not match audio" for r, _ in x["reasons"])]
        rest = [x for x in scored if x not in flagged]
        for group, label, color in ((rest, "other samples", "tab:blue"), (flagged, "transcript does not match audio",
                                                                            "tab:red")):
            ax.scatter([100 * x["scores"]["cer"] for x in group], [x["scores"]["margin"] for x in group], s=12,
                       label=f"{label} ({len(group)})", color=color)
        ax.set_xlabel("CER against the model's transcript (%)")
        ax.set_ylabel("loss margin per token")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "scores.png", dpi=100)
        plt.close(fig)
        written.append("scores.png")
    return written
