"""The evaluation report: `results.json` with every number, `report.md` with the tables, and matplotlib figures.

`write_report(results, out_dir)` only renders; the harness (training/evaluation/harness.py) computes. The results layout::

    {"dataset": {...sizes...}, "config": {...},
     "protocols": {"<protocol>": {"task": {...sizes...}, "description": str,
                                   "models": {"<model>": {"full": {"recall@10": ..., ...}, "novelty": {...},
                                                          "diversity": {...}, "coverage": {...}, "sampled": {...},
                                                          "training": {...}, "recommend_seconds": float,
                                                          "by_history_length": {"<bucket>": {...}}, ...}},
                                   "multi_interest_gain": {"basis": str, "groups": {"<n>": {...}}},
                                   "sections": [{"name", "results", "markdown", "figures"}]}}}
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers, and no GUI toolkit import
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)

from training.metrics import HARNESS_KS  # noqa: E402

MAIN_COLUMNS = (("recall@10", "R@10"), ("recall@50", "R@50"), ("recall@100", "R@100"), ("recall@500", "R@500"),
                ("ndcg@10", "NDCG@10"), ("ndcg@100", "NDCG@100"), ("hr@10", "HR@10"))
PROTOCOL_TEXT = {
    "leave_last_out": "leave-last-out: per user, the last item engaged with for the first time is the target and "
                      "everything before it the history; models learn only from events before each user's target",
    "temporal": "global temporal split: models learn from events before one cutoff; targets are the new items each "
                "user engaged with after it",
}


def to_jsonable(value: object) -> object:
    """Plain JSON values: nan/inf become null (strict JSON has no NaN), numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(value: object, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def preprocessing_lines(prep: dict | None) -> list[str]:
    """What `training.data.preprocess` did to the data set before the sizes above."""
    if not prep:
        return []
    r, b, a = prep["recipe"], prep["before"], prep["after"]
    core = (f"{r['min_user_engagements']}-core users, {r['min_item_engagements']}-core items "
            f"({prep['k_core_rounds']} rounds)" if max(r["min_user_engagements"], r["min_item_engagements"]) > 1
            else "no k-core")
    return [f"Preprocessing: {'duplicate rows removed' if r['dedup'] else 'no dedup'} "
            f"({prep['duplicates_removed']:,}); {core}; engagements: {prep['implicit']}. Loaded "
            f"{b['events']:,} events, {b['users']:,} users, {b['items']:,} items; kept {a['events']:,}, "
            f"{a['users']:,}, {a['items']:,}.", ""]


def main_table(models: dict) -> str:
    """Model x metrics, with novelty, diversity, coverage, training time and throughput."""
    header = ["model"] + [label for _, label in MAIN_COLUMNS] + [
        "novel R@100", "brand run@10", "brands@10", "coverage@100", "train s", "train ex/s", "recommend s"]
    rows = []
    for name, m in models.items():
        rows.append([name] + [m["full"].get(key) for key, _ in MAIN_COLUMNS] + [
            m["novelty"].get("recall@100"), m["diversity"]["longest_brand_run@10"], m["diversity"]["unique_brands@10"],
            m["coverage"].get("@100"), m["training"].get("seconds"), m["training"].get("examples_per_s"),
            m.get("recommend_seconds")])
    return _table(header, rows)


def training_table(models: dict) -> str:
    """Per neural model: epochs run of the budget, the best validation epoch and score, why it stopped, its time."""
    header = ["model", "epochs run", "budget", "best epoch", "best val NDCG@10", "val R@100", "stopped", "train s"]
    rows = [[name, v["epochs_run"], v["budget"], v["best_epoch"], v.get("val_ndcg@10"), v.get("val_recall@100"),
             v["stopped"], m["training"].get("seconds")]
            for name, m in models.items() if (v := m["training"].get("validation"))]
    return _table(header, rows) if rows else ""


def plot_validation_curves(models: dict, path: Path, title: str) -> bool:
    """Validation NDCG@10 per epoch, one line per neural model, the kept epoch marked; False when none has a curve."""
    curves = {n: m["training"]["validation"] for n, m in models.items()
              if (m["training"].get("validation") or {}).get("curve")}
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, v in curves.items():
        epochs, scores = zip(*v["curve"])
        line, = ax.plot(epochs, scores, marker=".", label=name)
        ax.plot([v["best_epoch"]], [v["val_ndcg@10"]], marker="*", markersize=12, color=line.get_color())
    ax.set(xlabel="epoch", ylabel="validation NDCG@10", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def seeds_table(models: dict) -> str:
    """Mean ± sample standard deviation over seeds of the main figures and the training time, per model."""
    rows = []
    for name, m in models.items():
        s = m.get("seeds")
        if not s:
            continue
        cell = lambda k: f"{s['mean'][k]:.4f} ± {s['std'][k]:.4f}" if len(s["seeds"]) > 1 else _fmt(s["mean"][k])
        rows.append([name, len(s["seeds"]), cell("ndcg@10"), cell("recall@100"), cell("recall@500"),
                     f"{s['mean']['train_seconds']:,.1f} ± {s['std']['train_seconds']:,.1f}"
                     if len(s["seeds"]) > 1 else _fmt(s["mean"]["train_seconds"])])
    return _table(["model", "seeds", "NDCG@10", "R@100", "R@500", "train s"], rows) if rows else ""


def sampled_table(models: dict) -> str:
    header = ["model", "sampler", "HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10", "trials"]
    rows = [[name, sampler, s["hr@1"], s["hr@5"], s["hr@10"], s["ndcg@5"], s["ndcg@10"], s["trials"]]
            for name, m in models.items() for sampler, s in m["sampled"].items()]
    return _table(header, rows)


def history_table(models: dict) -> str:
    buckets = list(next(iter(models.values()))["by_history_length"]) if models else []
    header = ["history length"] + [f"{name} R@100 / NDCG@10" for name in models] + ["users"]
    rows = []
    for b in buckets:
        cells = [f"{_fmt(m['by_history_length'][b]['recall@100'])} / {_fmt(m['by_history_length'][b]['ndcg@10'])}"
                 for m in models.values()]
        rows.append([b] + cells + [next(iter(models.values()))["by_history_length"][b]["users"]])
    return _table(header, rows)


def gain_table(gain: dict) -> str:
    header = [gain["basis"], "users", "multi_interest R@500", "two_tower R@500", "gain", "interests used"]
    return _table(header, [[n, g["users"], g["multi_interest"], g["two_tower"], g["gain"], g.get("interests_used")]
                           for n, g in gain["groups"].items()])


def plot_recall_curves(models: dict, path: Path, title: str) -> None:
    """Recall@k for k in HARNESS_KS, one line per model."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in models.items():
        ax.plot(HARNESS_KS, [m["full"].get(f"recall@{k}") or 0.0 for k in HARNESS_KS], marker="o", label=name)
    ax.set(xscale="log", xlabel="k", ylabel="Recall@k", title=title)
    ax.minorticks_off()  # log-scale minor labels would repeat the k values
    ax.set_xticks(HARNESS_KS, [str(k) for k in HARNESS_KS])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_by_history(models: dict, path: Path, title: str, metric: str = "recall@100") -> None:
    """`metric` per user-history-length bucket, one line per model."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in models.items():
        buckets = list(m["by_history_length"])
        ax.plot(buckets, [m["by_history_length"][b][metric] or 0.0 for b in buckets], marker="o", label=name)
    ax.set(xlabel="history length (items engaged before the prediction time)", ylabel=metric, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gain(gain: dict, path: Path, title: str) -> None:
    """Recall@500 of multi_interest minus two_tower per group of users (true interests, or history diversity on
    real data), with the user count on each bar."""
    fig, ax = plt.subplots(figsize=(6, 4))
    groups = gain["groups"]
    labels = list(groups)
    values = [groups[n]["gain"] or 0.0 for n in labels]
    bars = ax.bar(labels, values, color=["tab:green" if v >= 0 else "tab:red" for v in values])
    ax.bar_label(bars, labels=[f"n={groups[n]['users']}" for n in labels])
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set(xlabel=gain["basis"], ylabel="Recall@500 gain (multi_interest - two_tower)", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SEED_MODEL = "two_tower"  # the seed-000 model every other model is compared with


def seed_verdict(models: dict, metrics: tuple[str, ...] = ("ndcg@10", "recall@100")) -> str:
    """One sentence per metric: does the seed model beat every other model, or by how much does it fall short."""
    if SEED_MODEL not in models or len(models) < 2:
        return ""
    out = []
    for metric in metrics:
        seed = models[SEED_MODEL]["full"][metric]
        others = {n: m["full"][metric] for n, m in models.items() if n != SEED_MODEL and m["full"][metric] is not None}
        best = max(others, key=others.get)
        if seed is not None and seed > others[best]:
            out.append(f"{metric}: `{SEED_MODEL}` beats every other model ({seed:.4f}; next best `{best}` "
                       f"{others[best]:.4f}).")
        else:
            gap = others[best] - (seed or 0.0)
            out.append(f"{metric}: `{SEED_MODEL}` ({_fmt(seed)}) falls short of `{best}` ({others[best]:.4f}) by "
                       f"{gap:.4f} ({gap / others[best]:.0%} of the best).")
    return " ".join(out)


def _protocol_markdown(name: str, p: dict, out_dir: Path) -> tuple[list[str], list[str]]:
    """The markdown lines and the figure files of one protocol."""
    models, figures = p["models"], []
    lines = [f"## Protocol: {name}", "", p.get("description", PROTOCOL_TEXT.get(name, name)) + ".", "",
             "Full ranking over the whole catalog; **already-seen items excluded** from every ranking (an item the "
             "user engaged with before the prediction time is never recommended nor counted).", "",
             _table(["evaluated users", "targets", "train events", "train engagements", "items"],
                    [[p["task"]["evaluated_users"], p["task"]["targets"], p["task"]["train_events"],
                      p["task"]["train_engagements"], p["task"]["items"]]]), ""]
    if p.get("failed"):
        lines += ["### Failed models", "", "These models raised during training or ranking and have no results:", ""]
        lines += [f"- **{m}**: `{err.splitlines()[0][:300]}`" for m, err in p["failed"].items()] + [""]
    if not models:
        return lines, figures
    verdict = seed_verdict(models)
    lines += ["### Main table (full ranking)", "", main_table(models), ""] + ([verdict, ""] if verdict else []) + [
              "novel R@100: recall@100 on targets created after the new-item instant; brand run@10: mean longest run "
              "of same-brand items in the top 10; brands@10: mean distinct brands in the top 10; coverage@100: share "
              "of the catalog in any top-100 list; train ex/s: training examples (interactions for the baselines) "
              "per second.", ""]
    for fig_name, plot, caption in ((f"recall_at_k_{name}.png", plot_recall_curves, "Recall@k per model"),
                                    (f"by_history_length_{name}.png", plot_by_history,
                                     "Recall@100 by user history length")):
        plot(models, out_dir / fig_name, f"{caption} ({name})")
        figures.append(fig_name)
        lines += [f"![{caption}]({fig_name})", ""]
    lines += ["### By user history length", "", history_table(models), ""]
    if any(len((m.get("seeds") or {}).get("seeds", [])) > 1 for m in models.values()):
        lines += ["### Spread over seeds", "", "Mean ± sample standard deviation; neural models train once per seed "
                  "(initialisation, batch order, negatives, validation users) on the same split and users, the "
                  "deterministic baselines once. The other tables show the first seed.", "", seeds_table(models), ""]
    table = training_table(models)
    if table:
        lines += ["### Training against the validation split", "",
                  "Each neural model holds out a validation split of its training events (the same protocol one step "
                  "earlier: the next-to-last engagement, or the newest slice), is scored on it after every epoch, "
                  "stops once validation NDCG@10 has not improved for `patience` epochs, and keeps its best epoch's "
                  "weights. The epoch budget is an upper bound.", "", table, ""]
        warnings = [(n, m["training"]["validation"]["warning"]) for n, m in models.items()
                    if (m["training"].get("validation") or {}).get("warning")]
        lines += [f"- **Warning, {n}**: {w}." for n, w in warnings] + ([""] if warnings else [])
        searched = {n: m["training"]["search"] for n, m in models.items() if m["training"].get("search")}
        if searched:
            lines += ["Search over validation (each combination a whole fit; the best validation NDCG@10 is kept):",
                      "", _table(["model", "params", "val NDCG@10", "best epoch", "epochs run", "s", "kept"],
                                 [[n, json.dumps(r["params"]), r.get("val_ndcg@10"), r["best_epoch"], r["epochs_run"],
                                   r["seconds"], "yes" if r["params"] == s["chosen"] else ""]
                                  for n, s in searched.items() for r in s["runs"]]), ""]
            lines += [f"- {n}: no search key applies (skipped {s['skipped_keys']})." for n, s in searched.items()
                      if len(s["runs"]) == 1 and s["skipped_keys"]] + [""]
        fig_name = f"validation_{name}.png"
        if plot_validation_curves(models, out_dir / fig_name, f"Validation NDCG@10 per epoch ({name})"):
            figures.append(fig_name)
            lines += [f"![validation curves]({fig_name})", ""]
    if p.get("multi_interest_gain"):
        fig_name = f"multi_interest_gain_{name}.png"
        plot_gain(p["multi_interest_gain"], out_dir / fig_name, f"Multi-interest gain ({name})")
        figures.append(fig_name)
        basis = p["multi_interest_gain"]["basis"]
        lines += [f"### Multi-interest gain by {basis}" + (" (synthetic ground truth)" if basis == "true interests"
                                                          else " (the observable proxy on real data)"), "",
                  gain_table(p["multi_interest_gain"]), "", f"![multi-interest gain]({fig_name})", ""]
    lines += ["### Sampled protocol (ONLY for comparison with papers)", "",
              "Each target ranked among 100 sampled negatives the user has not seen; `popularity` draws negatives in "
              "proportion to training popularity (SASRec, BERT4Rec), `uniform` uniformly (NCF). Items below a "
              "model's top 500 tie and are ordered at random. Sampled metrics can order models differently from "
              "full ranking; decisions use the main table.", "", sampled_table(models), ""]
    for section in p.get("sections", []):
        lines += [f"### Section: {section['name']} (candidates: top 500 of {p.get('section_candidates')})", "",
                  section["markdown"], ""]
        figures += list(section.get("figures", []))
    return lines, figures


def write_report(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """Writes results.json, report.md and the figures into `out_dir`.

    Args:
        results: the harness's results (layout in the module docstring).
        out_dir: created when missing.

    Returns:
        {"json": path, "markdown": path, "figures": [paths]}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = results["dataset"]
    lines = [f"# Retrieval evaluation: {ds.get('name', '')}", "",
             _table(["format", "items", "users", "events", "engagements"],
                    [[ds.get("format"), ds.get("items"), ds.get("users"), ds.get("events"), ds.get("engagements")]]),
             ""] + preprocessing_lines(ds.get("preprocessing"))
    figures: list[str] = []
    for name, p in results["protocols"].items():
        proto_lines, proto_figures = _protocol_markdown(name, p, out_dir)
        lines += proto_lines
        figures += proto_figures
    lines += ["## Configuration", "", "```json", json.dumps(to_jsonable(results.get("config", {})), indent=2), "```", ""]
    json_path, md_path = out_dir / "results.json", out_dir / "report.md"
    json_path.write_text(json.dumps(to_jsonable(results | {"figures": figures}), indent=2, allow_nan=False) + "\n")
    md_path.write_text("\n".join(lines))
    return {"json": json_path, "markdown": md_path, "figures": [out_dir / f for f in figures]}
