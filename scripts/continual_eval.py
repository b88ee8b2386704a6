"""Continual learning: compare the strategies' results and write the report section.

    python -m scripts.continual_eval                       # every sequence under <base>/continual/
    python -m scripts.continual_eval --sequences lm-domains

Reads what scripts/continual_train.py wrote (<base>/continual/<sequence>/<strategy>.json) and writes
the "Continual learning" section of the report: per sequence, the R matrix of every strategy (row i =
after learning task i, column j = task j, plus the starting model), a comparison table (ACC, LA, BWT,
FWT, forgetting, forgetting relative to naive, added parameters and bytes, time) and a heat map of
the matrices. Signs: see nanochat/continual/loop.py (forgetting > 0 is worse, for bpb it is the increase
in bits per byte; BWT < 0 means earlier tasks got worse).
"""
import argparse
import json
import os

from nanochat.common import get_base_dir, print0, script_argv
from nanochat.continual.loop import STRATEGIES
from nanochat.report import get_report, subplots

ORDER = list(STRATEGIES[:3]) + ["lora", "lora-router"] + list(STRATEGIES[4:])
REHEARSAL = ("replay", "ewc", "ssr")  # the strategies that must cut naive's forgetting


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequences", default="", help="comma-separated sequence names (default: all with results)")
    p.add_argument("--dir", default="", help="results root (default <base>/continual)")
    p.add_argument("--no-report", action="store_true", help="print only")
    return p.parse_args(script_argv(argv))


def load_results(seq_dir):
    """{matrix name: (result dict, matrix dict)} for one sequence, in ORDER."""
    out = {}
    for strategy in STRATEGIES:
        path = os.path.join(seq_dir, f"{strategy}.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            r = json.load(f)
        for name, m in r["matrices"].items():
            out[name] = (r, m)
    return {k: out[k] for k in ORDER if k in out}


def _n(v, digits=4):
    return "n/a" if v is None or v != v else f"{v:.{digits}f}"


def matrix_table(tasks, base, R):
    head = "| after \\ on | " + " | ".join(tasks) + " |"
    lines = [head, "|" + "---|" * (len(tasks) + 1), "| (start) | " + " | ".join(_n(v) for v in base) + " |"]
    for i, row in enumerate(R):
        lines.append(f"| {tasks[i]} | " + " | ".join(_n(v) for v in row) + " |")
    return "\n".join(lines)


def comparison(results):
    """Rows of the comparison table (dicts), forgetting relative to naive included."""
    naive = results.get("naive")
    f_naive = naive[1]["forgetting"] if naive else None
    la_naive = naive[1]["LA"] if naive else None
    rows = []
    for name, (r, m) in results.items():
        cut = 100.0 * (1.0 - m["forgetting"] / f_naive) if f_naive and f_naive > 0 and name != "naive" else None
        rows.append({"strategy": name, "ACC": m["ACC"], "LA": m["LA"],
                     "LA vs naive": None if la_naive is None else m["LA"] - la_naive,
                     "BWT": m["BWT"], "FWT": m["FWT"], "forgetting": m["forgetting"], "cut vs naive %": cut,
                     "added params": r["added_params"], "added bytes": r["added_bytes"],
                     "train s": r["train_seconds"], "wall s": r["wall_seconds"]})
    return rows


# the comparison table's columns and how each cell is written (the strategy's name as it is; no value: "-")
COLUMNS = {"strategy": "{}", "ACC": "{:.4f}", "LA": "{:.4f}", "LA vs naive": "{:+.4f}", "BWT": "{:+.4f}",
           "FWT": "{:+.4f}", "forgetting": "{:.4f}", "cut vs naive %": "{:.0f}", "added params": "{:,}",
           "added bytes": "{:,}", "train s": "{:.0f}", "wall s": "{:.0f}"}


def comparison_table(rows):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = ["-" if row[c] is None else fmt.format(row[c]) for c, fmt in COLUMNS.items()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def heatmap(results, tasks, metric, higher_is_better, base, title, path_fn, filename):
    """One panel per strategy. Each cell shows R[i][j]; its colour is the change from the starting model
    on task j, oriented so that blue is better and red worse for both kinds of metric (tasks differ in
    how hard they are, so raw values would mostly show that). Forgetting = blue fading down a column."""
    s = 1.0 if higher_is_better else -1.0
    names = list(results)
    deltas = {n: [[s * (v - base[j]) for j, v in enumerate(row)] for row in results[n][1]["R"]] for n in names}
    lim = max([abs(v) for d in deltas.values() for row in d for v in row if v == v] + [1e-6])
    cols = min(3, len(names))
    nrows = (len(names) + cols - 1) // cols
    fig, axes = subplots(nrows, cols, figsize=(3.3 * cols + 1.5, 3.0 * nrows + 0.6), squeeze=False)
    for k, (ax, name) in enumerate(zip(axes.flat, names)):
        R = results[name][1]["R"]
        im = ax.imshow(deltas[name], cmap="RdBu", vmin=-lim, vmax=lim)
        for i, row in enumerate(R):
            for j, v in enumerate(row):
                r, g, b, _ = im.cmap(im.norm(deltas[name][i][j]))
                ax.text(j, i, f"{v:.3f}" if metric == "bpb" else f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white")
        ax.set_title(f"{name} (forgetting {results[name][1]['forgetting']:+.3f})", fontsize=9)
        ax.set_xticks(range(len(tasks)), tasks if k // cols == nrows - 1 or k + cols >= len(names) else [],
                      rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(tasks)), [f"after {t}" for t in tasks] if k % cols == 0 else [], fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8,
                 label=f"improvement in {metric} over the starting model (blue: better, red: worse)")
    fig.suptitle(title, fontsize=10)
    return path_fn(fig, filename)


def main(argv=None):
    args = parse_args(argv)
    root = args.dir or os.path.join(get_base_dir(), "continual")
    if args.sequences:
        names = [s.strip() for s in args.sequences.split(",") if s.strip()]
    else:
        names = (sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
                 if os.path.isdir(root) else [])
    report = None if args.no_report else get_report()
    data, images, summary = [], [], {}
    found = 0
    for seq in names:
        results = load_results(os.path.join(root, seq))
        if not results:
            print0(f"{seq}: no results in {os.path.join(root, seq)} (run scripts.continual_train first)")
            continue
        found += 1
        r0 = next(iter(results.values()))[0]
        tasks, metric, hib = r0["tasks"], r0["metric"], r0["higher_is_better"]
        rows = comparison(results)
        table = comparison_table(rows)
        settings = r0.get("settings", {})
        cfg = r0.get("config", {})
        print0(f"\n== {seq} ({metric}, {'higher' if hib else 'lower'} is better) ==\n{table}")
        data.append(f"### Sequence {seq}: " + " -> ".join(tasks))
        if r0.get("description"):
            data.append(r0["description"])
        data.append({"starting model": f"{settings.get('source')} (step {settings.get('step')})",
                     "metric": f"{metric} ({'higher' if hib else 'lower'} is better)",
                     "steps per task": cfg.get("steps"), "rows per step": cfg.get("batch_size"),
                     "row length (tokens)": settings.get("seq_len"), "lr (full)": cfg.get("lr"),
                     "lr (lora)": cfg.get("lora_lr"),
                     "lora rank/alpha": f"{cfg.get('lora_rank')}/{cfg.get('lora_alpha')}",
                     "replay buffer (rows) / ratio": f"{cfg.get('replay_size')} / {cfg.get('replay_ratio')}",
                     "ewc lambda": cfg.get("ewc_lambda"), "ssr pseudo-samples per task": cfg.get("ssr_samples"),
                     "router": "nearest centroid of base hidden states (task id unknown)"})
        data.append("Signs: ACC = mean final metric; LA = mean metric right after learning each task; forgetting "
                    "= mean over earlier tasks of (best earlier score - final score), oriented so > 0 is worse "
                    "(for bpb: the increase in bits per byte); BWT < 0 = earlier tasks got worse; FWT > 0 = "
                    "earlier tasks helped later ones. `cut vs naive` = how much of naive's forgetting a strategy "
                    "removes.")
        data.append("Comparison:\n\n" + table)
        checks = []
        for name in REHEARSAL:
            row = next((x for x in rows if x["strategy"] == name), None)
            if row and row["cut vs naive %"] is not None:
                checks.append(f"{name} cuts naive's forgetting by {row['cut vs naive %']:.0f}% "
                              f"({'meets' if row['cut vs naive %'] >= 50 else 'misses'} the 50% goal; "
                              f"new-task LA {row['LA']:.4f} vs naive {row['LA'] - row['LA vs naive']:.4f})")
        if checks:
            data.append("\n".join("- " + c for c in checks))
        lora_r = results.get("lora", (None,))[0]
        if lora_r and lora_r.get("router_accuracy"):
            final = lora_r["router_accuracy"][-1]
            data.append("Router (lora-router): share of each task's held-out items sent to that task's own adapter "
                        "after the last task: " + ", ".join(f"{t} {100 * a:.0f}%" for t, a in zip(tasks, final)))
        for name, (r, m) in results.items():
            data.append(f"R matrix, {name}:\n\n" + matrix_table(tasks, r["base"], m["R"]))
            summary[f"{name} forgetting ({metric})"] = m["forgetting"]  # one row per strategy: the headline
        if report is not None:
            title = f"{seq}: R[i][j] = {metric} on task j (column) after learning task i (row)"
            images.append((f"R matrices, {seq}", heatmap(results, tasks, metric, hib, r0["base"], title,
                                                         report.save_plot, f"continual_{seq}.png")))
    if not found:
        raise SystemExit(f"no continual-learning results under {root}")
    if report is not None:
        path = report.log(section="Continual learning", stage="CL", summary=summary, data=data, images=images)
        print0(f"report section written: {path}")


if __name__ == "__main__":
    main()
