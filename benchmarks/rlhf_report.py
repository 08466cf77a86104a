"""The RLHF benchmark's report: the table of every method against SFT and SFT+, the goals' verdicts, the plots
and the rows recorded in docs/benchmarks.md (`benchmarks/rlhf.py` runs the stages)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.harness import Table, command_line, record, verdict


def report(results: dict, rm_fig: dict, seconds: dict, n_pairs: int, *, task: str, root: Path, sweep: bool,
           record_figures: bool) -> None:  # fmt: skip
    """Print the table and the goals' verdicts, write root/results.json, and with `sweep` the plots in docs/img/
    (only then: a run without the sweep would replace them with fewer curves), with `record_figures` the headline
    rows of docs/benchmarks.md."""
    base, sft = results["sft+"]["accuracy"], results["sft"]["accuracy"]
    table = Table(["method", "held-out accuracy", "95% interval", "Δ vs SFT+ (points)", "Δ vs SFT", "KL to SFT (nats)",
                   "carries right", "others right", "RM on own samples"])  # fmt: skip
    for name, r in results.items():
        rl = name not in ("sft", "sft+")
        table.add(
            name,
            f"{r['accuracy']:.1%}",
            f"[{r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}]",
            f"{100 * (r['accuracy'] - base):+.1f}" if rl else "",
            f"{100 * (r['accuracy'] - sft):+.1f}" if rl else "",
            f"{r['kl']:.2f}" if "kl" in r else "",
            "{}/{}".format(*r["carry"]) if "carry" in r else "",
            "{}/{}".format(*r["no_carry"]) if "no_carry" in r else "",
            f"{r['rm_own']:.1%}" if "rm_own" in r else "",
        )
    print(f"\n{task}, greedy, n = {results['sft']['n']} held-out prompts each")
    print(table.render())
    rm_ok = rm_fig["rm"] >= 0.85 and rm_fig["rm"] > max(rm_fig["length"], rm_fig["sft_logprob"])
    # the goals are set against SFT+; checked against SFT too, in case more SFT made the baseline worse
    ppo_ok = 100 * (results["ppo"]["accuracy"] - max(base, sft)) >= 10
    dpo_ok = 100 * (results["dpo"]["accuracy"] - max(base, sft)) >= 5
    print(
        f"\nreward model: {rm_fig['rm']:.1%} pairwise on {rm_fig['pairs']} held-out well-formed pairs "
        f"(length {rm_fig['length']:.1%}, SFT log-prob {rm_fig['sft_logprob']:.1%}) from {n_pairs} non-tie pairs: "
        f"goal ≥ 85% and above both {verdict(rm_ok)}"
    )
    print(f"PPO ≥ SFT+ + 10 points and SFT + 10: {verdict(ppo_ok)}; DPO ≥ SFT+ + 5 and SFT + 5: {verdict(dpo_ok)}")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + f" (total {sum(seconds.values()):.0f})")
    (root / "results.json").write_text(
        json.dumps({"results": results, "reward_model": rm_fig, "seconds": seconds}, indent=1)
    )
    if sweep:
        plots(root)
    if record_figures:
        cmd = command_line()
        for name in ("sft", "sft+", "ppo", "dpo", "dpo-plain", "grpo", "best-of-8"):
            r = results[name]
            record(
                f"RLHF {task}, 2-layer 4-head char model: {name} held-out greedy accuracy (n={r['n']})",
                f"{r['accuracy']:.1%} [{r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}]"
                + (f", KL {r['kl']:.2f}" if "kl" in r else ""),
                cmd,
            )
        record(
            f"RLHF {task}: reward model pairwise accuracy, held-out well-formed pairs",
            f"{rm_fig['rm']:.1%} (length {rm_fig['length']:.1%}, SFT log-prob {rm_fig['sft_logprob']:.1%})",
            cmd,
        )


def plots(root: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmforge.runs import read_metrics

    out = Path("docs/img")
    out.mkdir(parents=True, exist_ok=True)
    # the main run and the smallest β beside it: where reward hacking shows
    runs = [(name, label) for name, label in (("ppo", "β 0.2 (main)"), ("ppo-beta0.05", "β 0.05"))
            if (root / name / "metrics.jsonl").is_file()]  # fmt: skip
    if runs:
        fig, axes = plt.subplots(1, len(runs), figsize=(7 * len(runs), 4.2), dpi=120, squeeze=False)
        for ax, (name, label) in zip(axes[0], runs):
            rows = [r for r in read_metrics(root / name) if "heldout_accuracy" in r]
            steps = [r["step"] for r in rows]
            ax.plot(steps, [r["heldout_accuracy"] for r in rows], "o-", label="true held-out accuracy (grader)")
            ax2 = ax.twinx()
            ax2.plot(steps, [r["heldout_rm_score"] for r in rows], "s--", color="tab:orange",
                     label="reward model score")  # fmt: skip
            ax.set_xlabel("PPO step")
            ax.set_ylabel("accuracy")
            ax2.set_ylabel("reward model score")
            ax.set_title(f"PPO {label}: what the reward model says vs what is true")
            lines = ax.get_legend_handles_labels()
            more = ax2.get_legend_handles_labels()
            ax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower left")
        fig.tight_layout()
        fig.savefig(out / "rlhf_reward_vs_accuracy.png")
        plt.close(fig)
    results = json.loads((root / "results.json").read_text())["results"]
    sweep = {k: v for k, v in results.items() if "beta" in v}
    if any("-beta" in k for k in sweep):
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
        for method, marker in (("ppo", "o"), ("dpo", "s")):
            pts = sorted((v["kl"], v["accuracy"], v["beta"]) for k, v in sweep.items()
                         if k.startswith(method) and k != "dpo-plain")  # fmt: skip
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker + "-", label=method.upper())
            for kl, acc, beta in pts:
                ax.annotate(f"β={beta:g}", (kl, acc), fontsize=7)
        ax.axhline(results["sft+"]["accuracy"], color="gray", ls=":", label="SFT+")
        ax.axhline(results["sft"]["accuracy"], color="gray", ls="--", label="SFT")
        ax.set_xlabel("KL to the SFT policy (nats per response)")
        ax.set_ylabel("held-out accuracy")
        ax.set_title("Accuracy vs KL across β")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "rlhf_accuracy_vs_kl.png")
        plt.close(fig)
