"""Plots and a Markdown table from the metrics.jsonl of one or more training runs.

    .venv/bin/python report.py runs/demo --out runs/demo/report
    .venv/bin/python report.py runs/kd runs/crld --out reports/kd_vs_crld --title "KD vs CRLD"

A RUN_DIR is a run folder (one holding metrics.jsonl) or any folder above several; each run is labelled by its
path relative to the runs' common parent. A group run's folder (train.py --student) gives one row and one curve
per student, labelled with the overrides its group.json lists (and "stopped" for a student that stopped).
Writes OUT/curves.png (val top-1, training loss with its components dashed, LR, samples/s, per epoch) and
OUT/summary.md (one row per run, or per set of seeds). summary.json is used where present
(it is missing while a run is still going); otherwise the figures come from metrics.jsonl and config.yaml.

Runs whose config.yaml files differ only in their seeds (`run.seed`, `model.init_seed`) and in where they are
written, what they read from and how they log (`BOOKKEEPING_KEYS`), and that reached the same epoch, share one
row: best and last top-1 as mean ± sample standard deviation over the runs, n and the seed that varied in the
`seeds` column (`run.seed`: data order, augmentation and initialisation; `model.init_seed`: initialisation
only). Anything else that differs, a run without config.yaml, or two runs with the same seeds keep their rows
apart. The curves stay one per run.
Bad input (missing folder, no metrics.jsonl, empty or malformed line) -> one line on stderr, exit code 2,
and nothing written.
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # no display; set before pyplot is imported
import matplotlib.pyplot as plt
import yaml
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from common import flat_items
from common.files import atomic_path, check_writable, writing
from pipelines.sources import DataError  # a user error for training.cli.run_main: one line, exit code 2
from training.cli import run_main

NOT_LOSS_PARTS = ("train_loss", "train_top1", "train_top5")
SEED_KEYS = ("run.seed", "model.init_seed")
# where a run is written and read from, how it logs, how many threads feed it: seeds launched on other
# machines or folders still share a row (a subset of what --resume lets change, training/student.py)
BOOKKEEPING_KEYS = ("run.name", "run.out_dir", "run.progress", "run.log_every", "run.save_every", "run.cpus",
                    "run.save_every_min", "run.tensorboard", "run.dist_timeout_s", "pipeline.num_workers",
                    "pipeline.host_threads", "pipeline.dali_threads", "pipeline.dali_prefetch", "data.root",
                    "teacher.cache")
SEED_KINDS = {  # which seeds varied across a row's runs -> what the spread measures
    (True, True): "run.seed", (True, False): "run.seed, init fixed", (False, True): "model.init_seed"}
DASHES = ["--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 3))]


def find_runs(paths):
    """Run folders (holding metrics.jsonl) named by or found below `paths`, in order, without repeats."""
    runs = []
    for p in paths:
        if not os.path.exists(p):
            raise DataError(f"{p}: no such file or directory")
        if not os.path.isdir(p):
            raise DataError(f"{p}: not a directory")
        found = sorted(root for root, _, files in os.walk(p) if "metrics.jsonl" in files)
        if not found:
            raise DataError(f"{p}: no metrics.jsonl in it or below it")
        runs += [os.path.abspath(r) for r in found if os.path.abspath(r) not in runs]
    return runs


def read_metrics(path):
    """One dict per epoch; a resumed run may log an epoch twice, the later line wins."""
    by_epoch = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                raise DataError(f"{path}: line {n}: empty line")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
                raise DataError(f"{path}: line {n}: not a JSON object with an integer 'epoch'")
            by_epoch[row["epoch"]] = row
    if not by_epoch:
        raise DataError(f"{path}: empty, no epoch logged yet")
    return [by_epoch[e] for e in sorted(by_epoch)]


def read_optional(path, parse):
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = parse(f)
    except (ValueError, yaml.YAMLError) as e:
        raise DataError(f"{path}: unreadable ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a mapping at the top level")
    return data


def load_run(run_dir, label):
    metrics = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    summary = read_optional(os.path.join(run_dir, "summary.json"), json.load)
    cfg = read_optional(os.path.join(run_dir, "config.yaml"), yaml.safe_load)
    if not summary.get("model") or not summary.get("method"):
        for key in ("model", "method"):
            section = cfg.get(key)
            summary.setdefault(key, section.get("name") if isinstance(section, dict) else None)
    return {"label": label + group_note(run_dir, summary), "metrics": metrics, "summary": summary,
            "config": dict(flat_items(cfg))}


def group_note(run_dir, summary):
    """' (model.name=resnet14)' for a student of a group run: its overrides from the group's group.json."""
    doc = read_optional(os.path.join(os.path.dirname(run_dir), "group.json"), json.load)
    mine = [s for s in doc.get("students", []) if isinstance(s, dict) and s.get("dir") == os.path.basename(run_dir)]
    if not mine:
        return ""
    parts = [f"{k}={v}" for k, v in (mine[0].get("overrides") or {}).items()]
    parts += ["stopped"] if summary.get("failed") else []
    return f" ({', '.join(parts)})" if parts else ""


def series(metrics, key):
    pts = [(m["epoch"], m[key]) for m in metrics if isinstance(m.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def loss_parts(metrics):
    keys = dict.fromkeys(k for m in metrics for k in m)  # first-seen order
    parts = [k for k in keys if k.startswith("train_") and k not in NOT_LOSS_PARTS
             and not k.endswith(("_rate", "_frac", "_s"))]
    return parts if len(parts) > 1 else []  # a lone part is the total itself


def figures(run):
    """The table's numbers for one run."""
    s, metrics = run["summary"], run["metrics"]
    epochs, top1 = series(metrics, "val_top1")
    best, best_ep = s.get("best_top1"), s.get("best_epoch")
    if best is None and top1:
        best, best_ep = max(zip(top1, epochs), key=lambda t: t[0])  # the first epoch reaching the best
    last = metrics[-1]
    speeds = series(metrics, "samples_per_s")[1]
    return {"method": s.get("method"), "model": s.get("model"), "epochs": s.get("epochs", last["epoch"]),
            "best": best, "best_epoch": best_ep, "last1": s.get("last_top1", last.get("val_top1")),
            "last5": s.get("last_top5", last.get("val_top5")),
            "speed": s.get("samples_per_s", sum(speeds) / len(speeds) if speeds else None),
            "wall": s.get("wall_time_s", sum(series(metrics, "epoch_time_s")[1]) or None),
            "teacher": s.get("teacher_top1")}


def seed_rows(runs):
    """The table's rows in the runs' order: lists of runs, several where they differ only in their seeds."""
    groups, order = {}, []
    for run in runs:
        cfg = run["config"]
        if not cfg or any(k not in cfg for k in SEED_KEYS):
            key = ("alone", id(run))
        else:
            rest = {k: v for k, v in cfg.items() if k not in SEED_KEYS + BOOKKEEPING_KEYS}
            # a run stopped early or still going is not a seed of a finished one
            key = (json.dumps(rest, sort_keys=True, default=str), run["metrics"][-1]["epoch"],
                   bool(run["summary"].get("failed")))
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(run)
    rows = []
    for key in order:
        group = groups[key]
        seeds = [tuple(r["config"][k] for k in SEED_KEYS) for r in group] if key[0] != "alone" else []
        if len(group) > 1 and len(set(seeds)) < len(seeds):  # repeats of one seed: not a spread over seeds
            rows += [[r] for r in group]
        else:
            rows.append(group)
    return rows


def seed_note(group):
    """'n: which seed varied (its values)' for a row of several runs; '1' for one run."""
    if len(group) == 1:
        return "1"
    values = [[r["config"][k] for r in group] for k in SEED_KEYS]
    varied = tuple(len(set(map(str, v))) > 1 for v in values)
    shown = values[0] if varied[0] else values[1]
    return f"{len(group)}: {SEED_KINDS[varied]} {','.join(map(str, shown))}"


def table_row(group):
    f = [figures(r) for r in group]
    first = f[0]
    if len(group) == 1:
        label = group[0]["label"]
        best = f"{fmt(first['best'])} ({first['best_epoch']})" if first["best"] is not None else "–"
        last = f"{fmt(first['last1'])} / {fmt(first['last5'])}"
    else:
        labels = [r["label"] for r in group]
        label = ", ".join(labels) if len(labels) == 2 else f"{labels[0]} … {labels[-1]}"
        best = mean_std([x["best"] for x in f])
        last = f"{mean_std([x['last1'] for x in f])} / {mean_std([x['last5'] for x in f])}"
    return [label.replace("|", "\\|"), first["method"] or "–", first["model"] or "–", str(first["epochs"]),
            seed_note(group), best, last, fmt(mean([x["speed"] for x in f]), "{:.0f}"),
            duration(mean([x["wall"] for x in f])), fmt(mean([x["teacher"] for x in f]))]


def mean(values):
    """The mean, or None when any run lacks the figure."""
    if not values or not all(isinstance(v, (int, float)) for v in values):
        return None
    return sum(values) / len(values)


def mean_std(values):
    """'mean ± sample standard deviation' (n - 1 in the denominator), or '–' when any run lacks the figure."""
    m = mean(values)
    if m is None:
        return "–"
    return f"{m:.2f} ± {(sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5:.2f}"


def fmt(v, spec="{:.2f}"):
    return spec.format(v) if isinstance(v, (int, float)) else "–"


def duration(seconds):
    if not isinstance(seconds, (int, float)):
        return "–"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


def summary_md(runs, title, common):
    rows = seed_rows(runs)
    head = ["run", "method", "model", "epochs", "seeds", "best top-1 (epoch)", "last top-1 / top-5",
            "mean samples/s", "wall time", "teacher top-1"]
    lines = [f"# {title}", "", f"{len(runs)} run(s) under `{common}`.", ""]
    if any(len(g) > 1 for g in rows):
        lines += ["A row of several runs differs only in its seeds: best and last top-1 are mean ± sample "
                  "standard deviation over them, the other figures means. `seeds`: how many runs, the seed "
                  "that varied and its values (`run.seed`: data order, augmentation and initialisation; "
                  "`run.seed, init fixed`: data order and augmentation; `model.init_seed`: initialisation "
                  "only).", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(table_row(g)) + " |" for g in rows]
    return "\n".join(lines + ["", "![training curves](curves.png)", ""])


def curves(runs, title):
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    panels = [("val_top1", "validation top-1 (%)"), ("train_loss", "training loss"),
              ("lr", "learning rate"), ("samples_per_s", "throughput (samples/s)")]
    parts = list(dict.fromkeys(p for r in runs for p in loss_parts(r["metrics"])))
    dash = {p: DASHES[i % len(DASHES)] for i, p in enumerate(parts)}
    colors = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20").colors
    for ax, (key, name) in zip(axes.flat, panels):
        for i, run in enumerate(runs):
            color = colors[i % len(colors)]
            ax.plot(*series(run["metrics"], key), color=color, label=run["label"], marker=".", markersize=4)
            if key == "train_loss":
                for p in loss_parts(run["metrics"]):
                    ax.plot(*series(run["metrics"], p), color=color, linestyle=dash[p], linewidth=1, alpha=0.8)
        ax.set(title=name, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if not any(len(line.get_xdata()) for line in ax.lines):
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    axes[0, 0].legend(fontsize="small")
    if parts:  # line styles in the loss panel: solid total, one dash pattern per component
        styles = [Line2D([], [], color="gray", label="total")]
        styles += [Line2D([], [], color="gray", linestyle=dash[p], label=p[len("train_"):]) for p in parts]
        axes[0, 1].legend(handles=styles, fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def write_outputs(out_dir, runs, title, common):
    """Render both files under temporary names, then move them into place; on failure leave nothing."""
    created = not os.path.isdir(out_dir)
    with writing(out_dir):
        os.makedirs(out_dir, exist_ok=True)
    try:  # both written before either takes its name
        with writing(out_dir), atomic_path(os.path.join(out_dir, "curves.png")) as png, \
                atomic_path(os.path.join(out_dir, "summary.md")) as md:
            fig = curves(runs, title)
            try:
                fig.savefig(png, format="png", dpi=110)
            finally:
                plt.close(fig)
            with open(md, "w", encoding="utf-8") as f:
                f.write(summary_md(runs, title, common))
    except BaseException:
        if created and not os.listdir(out_dir):
            os.rmdir(out_dir)
        raise


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run folder, or a folder above several")
    ap.add_argument("--out", required=True, help="folder for curves.png and summary.md")
    ap.add_argument("--title", default="Training report")
    args = ap.parse_args(argv)
    check_writable(args.out)
    run_dirs = find_runs(args.run_dirs)
    common = os.path.commonpath([os.path.dirname(r) for r in run_dirs])
    runs = [load_run(r, os.path.relpath(r, common)) for r in run_dirs]  # all input is read before any output
    shown = os.path.relpath(common)
    write_outputs(args.out, runs, args.title, common if shown.startswith("..") else shown)
    averaged = [g for g in seed_rows(runs) if len(g) > 1]
    print(f"wrote {os.path.join(args.out, 'curves.png')} and {os.path.join(args.out, 'summary.md')} "
          f"({len(runs)} run(s)" + (f"; {len(averaged)} row(s) averaged over seeds" if averaged else "") + ")")
    for g in averaged:
        best = mean_std([figures(r)["best"] for r in g])
        last = mean_std([figures(r)["last1"] for r in g])
        print(f"  {table_row(g)[0]}: {seed_note(g)}: best top-1 {best}, last top-1 {last}")


if __name__ == "__main__":
    sys.exit(run_main(main))
