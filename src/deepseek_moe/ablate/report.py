"""The ablation's outputs: results.json, claims.json (the paper's claims, paired by seed), results.md and three plots
(curves, redundancy, shared expert)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepseek_moe.ablate.claims import claims_markdown, evaluate_claims
from deepseek_moe.ablate.variants import Counts
from deepseek_moe.figure import figure

if TYPE_CHECKING:
    from deepseek_moe.ablate.config import AblationConfig


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _mean_entropy(runs: list[dict[str, Any]]) -> float | None:
    values = [e for r in runs for _, e in r.get("entropy_curve", [])]
    return sum(values) / len(values) if values else None


def result_rows(cfg: AblationConfig, counts: dict[str, Counts],
                analyses: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per variant: counts, the final validation loss over seeds, speed and the final expert load."""
    rows = []
    for v in cfg.variants:
        runs, c = analyses[v], counts[v]
        losses = [r["val_loss"] for r in runs]
        mean, std = mean_std(losses)
        loads = [r["load_max_over_mean"] for r in runs if "load_max_over_mean" in r]
        row: dict[str, Any] = {
            "variant": v, "total_params": c.total_params, "activated_params": c.activated_params,
            "ffn_total_params": c.ffn_total, "ffn_activated_params": c.ffn_activated,
            "router_params": c.router_params, "flops_per_token": c.flops_per_token,
            "val_loss": mean, "val_loss_std": std, "val_loss_seeds": losses, "seeds": list(cfg.seeds),
            "tokens_per_s": mean_std([r["tokens_per_s"] for r in runs])[0],
            # Final validation pass: per MoE layer, the busiest expert's tokens over the mean; averaged over
            # layers, then seeds (1.0 is perfect balance; None for dense models).
            "load_max_over_mean": mean_std(loads)[0] if loads else None,
            "load_cv": mean_std([r["load_cv"] for r in runs])[0] if loads else None,
            # mean over training steps, then seeds: the share of assignments dropped, the routing entropy
            "dropped": mean_std([r.get("dropped", 0.0) for r in runs])[0],
            "routing_entropy": _mean_entropy(runs),
        }
        if "capacity_mean" in runs[0]:
            row["capacity_mean"] = mean_std([r["capacity_mean"] for r in runs])[0]
            row["capacity_final"] = mean_std([r["capacity_final"] for r in runs])[0]
        if "redundancy" in runs[0]:
            row["redundancy"] = [
                {"ratio": p[0], "masked": p[1], "val_loss": mean_std([r["redundancy"][i][2] for r in runs])[0],
                 "val_loss_std": mean_std([r["redundancy"][i][2] for r in runs])[1]}
                for i, p in enumerate(runs[0]["redundancy"])]
        if "shared_disabled_loss" in runs[0]:
            before = mean_std([r["analysis_loss"] for r in runs])
            after = mean_std([r["shared_disabled_loss"] for r in runs])
            row["shared_expert_test"] = {"val_loss": before[0], "val_loss_std": before[1],
                                         "shared_disabled_val_loss": after[0],
                                         "shared_disabled_val_loss_std": after[1]}
        rows.append(row)
    return rows


def results_markdown(cfg: AblationConfig, rows: list[dict[str, Any]],
                     claims: list[dict[str, Any]] | None = None) -> str:
    seeds = ", ".join(map(str, cfg.seeds))
    lines = [
        f"# DeepSeekMoE ablation: {cfg.steps} steps x {cfg.batch_size} x {cfg.seq_len} tokens "
        f"({cfg.tokens_per_run:,} tokens per run), seeds {seeds}",
        "",
        f"Base: N = {cfg.shape.n_experts} experts of width W = {cfg.shape.expert_dim}, top-2; dim "
        f"{cfg.shape.dim}, {cfg.shape.n_layers} layers (the first dense, width 2W, in every variant); m = "
        f"{cfg.shape.segmentation}. Validation loss in nats/token on the whole validation split, mean ± sample "
        "std over seeds. Parameters counted from the modules (FFN: the MoE layers' experts).",
        "",
        "| variant | total params | activated | FFN total | FFN activated | router | MFLOP/token | val loss | "
        "per seed | tokens/s | max/mean load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        load = "–" if r["load_max_over_mean"] is None else f"{r['load_max_over_mean']:.2f}"
        lines.append(
            f"| {r['variant']} | {r['total_params']:,} | {r['activated_params']:,} | {r['ffn_total_params']:,} | "
            f"{r['ffn_activated_params']:,} | {r['router_params']:,} | {r['flops_per_token'] / 1e6:.2f} | "
            f"{r['val_loss']:.4f} ± {r['val_loss_std']:.4f} | "
            f"{', '.join(f'{x:.4f}' for x in r['val_loss_seeds'])} | {r['tokens_per_s']:,.0f} | {load} |")
    red = [r for r in rows if "redundancy" in r]
    if red:
        lines += ["", "## Redundancy (paper §4.5): top routed experts masked per token, the next ones taken", "",
                  "| variant | ratio masked | experts masked | val loss |", "|---|---:|---:|---:|"]
        for r in red:
            for p in r["redundancy"]:
                lines.append(f"| {r['variant']} | {p['ratio']:.3f} | {p['masked']} | "
                             f"{p['val_loss']:.4f} ± {p['val_loss_std']:.4f} |")
    balance = [r for r in rows if r["variant"].startswith("deepseekmoe")]
    if any(r["dropped"] > 0 or "capacity_mean" in r or r["variant"] == "deepseekmoe_entropy" for r in balance):
        lines += ["", "## Balance: dropping, capacity and routing entropy (means over training steps and seeds)", "",
                  "| variant | val loss | dropped | capacity factor mean (final) | routing entropy |",
                  "|---|---:|---:|---:|---:|"]
        for r in balance:
            cap = (f"{r['capacity_mean']:.3f} ({r['capacity_final']:.3f})" if "capacity_mean" in r
                   else "–")
            ent = "–" if r["routing_entropy"] is None else f"{r['routing_entropy']:.3f}"
            lines.append(f"| {r['variant']} | {r['val_loss']:.4f} ± {r['val_loss_std']:.4f} | {r['dropped']:.2%} | "
                         f"{cap} | {ent} |")
    shared = [r for r in rows if "shared_expert_test" in r]
    for r in shared:
        t = r["shared_expert_test"]
        lines += ["", "## Shared expert (paper §4.5): disabled, one more routed expert activated", "",
                  "| variant | val loss | shared disabled, +1 routed |", "|---|---:|---:|",
                  f"| {r['variant']} | {t['val_loss']:.4f} ± {t['val_loss_std']:.4f} | "
                  f"{t['shared_disabled_val_loss']:.4f} ± {t['shared_disabled_val_loss_std']:.4f} |"]
    if claims:
        lines += ["", *claims_markdown(claims)]
    lines += ["", "Plots: `val_loss_curves.png`, `val_loss_vs_gshard.png`, `redundancy.png`, `shared_expert.png`, "
              "`routing_entropy.png` (those the variants trained allow).", ""]
    return "\n".join(lines)


def plot_curves(cfg: AblationConfig, analyses: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Validation loss against tokens: mean over seeds, band = min..max over seeds."""
    tokens_per_step = cfg.batch_size * cfg.seq_len
    title = f"Validation loss, mean over {len(cfg.seeds)} seed(s)" + (" (band: min–max)" if len(cfg.seeds) > 1
                                                                         else "")
    with figure(path, figsize=(8, 5), title=title, xlabel="training tokens (M)",
                ylabel="validation loss (nats/token)", legend=True) as ax:
        for v in cfg.variants:
            curves = [dict((int(s), float(loss)) for s, loss in r["curve"]) for r in analyses[v]]
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            if not steps:
                continue
            x = [s * tokens_per_step / 1e6 for s in steps]
            values = [[c[s] for c in curves] for s in steps]
            mean = [sum(vs) / len(vs) for vs in values]
            line, = ax.plot(x, mean, label=v, linewidth=1.5)
            if len(curves) > 1:
                ax.fill_between(x, [min(vs) for vs in values], [max(vs) for vs in values], color=line.get_color(),
                                alpha=0.2, linewidth=0)
        finals = [min(r["val_loss"] for r in analyses[v]) for v in cfg.variants]
        ax.set_ylim(min(finals) - 0.3, min(finals) + 1.5)  # the end of training, where the variants separate


def plot_relative(cfg: AblationConfig, analyses: dict[str, list[dict[str, Any]]], path: Path,
                  base: str = "gshard") -> None:
    """Each variant's validation loss minus ``base``'s at the same seed and step (mean, band min..max over seeds):
    the curves themselves differ by less than their spread over seeds, the paired differences do not."""
    if base not in analyses:
        return
    tokens_per_step = cfg.batch_size * cfg.seq_len
    base_curves = [dict((int(s), float(loss)) for s, loss in r["curve"]) for r in analyses[base]]
    title = f"Paired by seed, relative to {base}" + (" (band: min–max over seeds)" if len(cfg.seeds) > 1 else "")
    with figure(path, figsize=(8, 5), title=title, xlabel="training tokens (M)",
                ylabel=f"validation loss minus {base}'s, same seed (nats/token)", legend={"fontsize": 8}) as ax:
        for v in cfg.variants:
            curves = [dict((int(s), float(loss)) for s, loss in r["curve"]) for r in analyses[v]]
            steps = sorted(set.intersection(*(set(c) for c in curves + base_curves)))
            if v == base or not steps:
                continue
            x = [s * tokens_per_step / 1e6 for s in steps]
            deltas = [[c[s] - b[s] for c, b in zip(curves, base_curves, strict=True)] for s in steps]
            line, = ax.plot(x, [sum(d) / len(d) for d in deltas], label=v, linewidth=1.5)
            if len(curves) > 1:
                ax.fill_between(x, [min(d) for d in deltas], [max(d) for d in deltas], color=line.get_color(),
                                alpha=0.15, linewidth=0)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_ylim(-0.25, 0.25)  # the early steps differ by more; the end of training is what the claims are about


def plot_entropy(cfg: AblationConfig, analyses: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Routing entropy over training (mean over seeds) of the MoE variants: where routing collapses, and whether
    the regulariser holds it open early."""
    curves = {v: [dict((int(s), float(e)) for s, e in r.get("entropy_curve", [])) for r in analyses[v]]
              for v in cfg.variants}
    curves = {v: c for v, c in curves.items() if all(c)}
    if not curves:
        return
    tokens_per_step = cfg.batch_size * cfg.seq_len
    with figure(path, figsize=(7, 4), title="Routing entropy during training (mean over seeds)",
                xlabel="training tokens (M)", ylabel="normalised routing entropy (1: uniform)",
                legend={"fontsize": 8}) as ax:
        for v, runs in curves.items():
            steps = sorted(set.intersection(*(set(c) for c in runs)))
            ax.plot([s * tokens_per_step / 1e6 for s in steps], [sum(c[s] for c in runs) / len(runs) for s in steps],
                    label=v, linewidth=1.2)


def plot_redundancy(rows: list[dict[str, Any]], path: Path) -> None:
    if not any("redundancy" in r for r in rows):
        return
    with figure(path, figsize=(6, 4), title="Redundancy: top experts masked, next ones routed to",
                xlabel="ratio of each token's top routed experts masked", ylabel="validation loss (nats/token)",
                legend=True) as ax:
        for r in rows:
            if "redundancy" not in r:
                continue
            pts = r["redundancy"]
            ax.errorbar([p["ratio"] for p in pts], [p["val_loss"] for p in pts],
                        yerr=[p["val_loss_std"] for p in pts], marker="o", capsize=3, label=r["variant"])


def plot_shared(rows: list[dict[str, Any]], path: Path) -> None:
    tests = [r for r in rows if "shared_expert_test" in r]
    if not tests:
        return
    t = tests[0]["shared_expert_test"]
    with figure(path, figsize=(5, 4), title=f"{tests[0]['variant']}: shared expert test",
                ylabel="validation loss (nats/token)", grid=False) as ax:
        ax.bar(["trained", "shared off,\n+1 routed"], [t["val_loss"], t["shared_disabled_val_loss"]],
               yerr=[t["val_loss_std"], t["shared_disabled_val_loss_std"]], capsize=4, color=["C0", "C3"])


def write_report(cfg: AblationConfig, out: Path, counts: dict[str, Counts],
                 analyses: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    from deepseek_moe.train.rundir import write_json

    rows = result_rows(cfg, counts, analyses)
    claims = evaluate_claims(analyses)
    write_json(out / "results.json", rows)
    write_json(out / "claims.json", claims)
    (out / "results.md").write_text(results_markdown(cfg, rows, claims))
    plot_curves(cfg, analyses, out / "val_loss_curves.png")
    plot_relative(cfg, analyses, out / "val_loss_vs_gshard.png")
    plot_redundancy(rows, out / "redundancy.png")
    plot_entropy(cfg, analyses, out / "routing_entropy.png")
    plot_shared(rows, out / "shared_expert.png")
    return rows


__all__ = ["mean_std", "plot_curves", "plot_entropy", "plot_relative", "plot_redundancy", "plot_shared", "result_rows", "results_markdown", "write_report"]
