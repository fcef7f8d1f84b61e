"""The summary of a `gpu_window/run.sh` output folder, as Markdown on stdout: stages (status, seconds),
correctness checks, step and end-to-end rates with e2e / step per configuration, loader and strong-program rates.

    python -m gpu_window.summary OUT_DIR > OUT_DIR/summary.md

Reads whatever the stages left (a stage that failed or never ran is simply missing from its table).
"""
import csv
import json
import os
import sys

KEYS = ("teacher_source", "amp", "channels_last", "compile")


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def stages(out):
    path = os.path.join(out, "stages.tsv")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    lines = ["## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {r['status']} | {r['seconds']} |" for r in rows]
    return lines + [""]


def _commit(git):
    if isinstance(git, dict):
        return (git.get("commit") or "?")[:12] + (" (uncommitted changes)" if git.get("dirty") else "")
    return git


def checks(out):
    lines = []
    pre = _load(os.path.join(out, "preflight", "preflight.json"))
    if pre:
        env, mm = pre.get("env", {}), pre.get("matmul_bf16", {})
        lines += ["## Preflight", "", f"{env.get('device_name')}, torch {env.get('torch')} (CUDA {env.get('cuda')}), "
                  f"Python {env.get('python')}, commit {_commit(env.get('git'))}; bf16 matmul {mm.get('tflops', 0):.1f} TFLOP/s", ""]
        for k in ("dali", "ffcv", "apex", "project", "project_dali", "project_ffcv"):
            v = env.get(k)
            if isinstance(v, dict):
                lines.append(f"- {k}: " + (v.get("version", "ok") if v.get("importable") else
                                          f"not importable ({v.get('error')})"))
        lines.append("")
    for group, title in (("correctness", "Correctness"), ("dali_check", "DALI")):
        doc = _load(os.path.join(out, f"{group}.json"))  # tests/cuda's records (CRLD_CHECKS_REPORT)
        if not doc:
            continue
        lines += [f"## {title} checks ({doc.get('device')})", "", "| check | result | seconds | details |",
                  "|---|---|---|---|"]
        for c in doc.get("checks", []):
            res = {"passed": "pass", "failed": "FAIL"}.get(c["outcome"], c["outcome"])
            detail = str(c.get("error") or c.get("summary", "")).replace("|", "/")
            lines.append(f"| {c['name']} | {res} | {c['seconds']:.1f} | {detail} |")
        lines.append("")
    return lines


def _first_line(error):
    return (str(error or "?").strip().splitlines() or ["?"])[0].replace("|", "/")[:160]


def _cfg(r):
    return "/".join([r.get("pipeline", "-"), r["teacher_source"], f"amp={r['amp']}",
                     "cl" if r["channels_last"] else "nchw"] + (["compiled"] if r.get("compile") else []))


def rates(out, pair, step_file, e2e_files):
    """Step-mode and e2e rows of one model pair; each e2e row divided by the step row of the same configuration."""
    step = _load(os.path.join(out, step_file)) or []
    e2e = [r for f in e2e_files for r in (_load(os.path.join(out, f)) or [])]
    if not step and not e2e:
        return []
    lines = [f"## {pair}", "", "| mode | configuration | samples/s | data wait | peak MiB | e2e / step |",
             "|---|---|---|---|---|---|"]
    # a configuration that raised is a record with its error instead of a rate
    lines += [f"| {mode} | {r.get('pipeline', '-')}/{r.get('teacher_source')}/amp={r.get('amp')} | FAILED: "
              f"{_first_line(r.get('error'))} | | | |"
              for mode, rs in (("step", step), ("e2e", e2e)) for r in rs if "samples_per_s" not in r]
    step, e2e = [r for r in step if "samples_per_s" in r], [r for r in e2e if "samples_per_s" in r]
    for r in step:
        lines.append(f"| step | {'REFERENCE ' if r.get('reference') else ''}{_cfg(dict(r, pipeline='-'))} | "
                     f"{r['samples_per_s']:.0f} | {r['data_wait_frac']:.1%} | {r.get('peak_memory_mib') or 0:.0f} | |")
    for r in e2e:
        same = next((s for s in step if all(s[k] == r[k] for k in KEYS)), None)
        ratio = f"{r['samples_per_s'] / same['samples_per_s']:.0%}" if same else "-"
        lines.append(f"| e2e | {'REFERENCE ' if r.get('reference') else ''}{_cfg(r)} | {r['samples_per_s']:.0f} | "
                     f"{r['data_wait_frac']:.1%} | {r.get('peak_memory_mib') or 0:.0f} | {ratio} |")
    return lines + [""]


def _calls(n):
    return "-" if n is None else f"{n:.0f}"


def loaders(out):
    recs = _load(os.path.join(out, "dali_loader.json")) or []
    lines = []
    if recs:
        lines += ["## Loaders alone", "", "| pipeline | route | two-view samples/s | Python calls/batch |", "|---|---|---|---|"]
        lines += [f"| {r['pipeline']} | {r.get('route')} | {r['samples_per_s']:.0f} | "
                  f"{_calls(r.get('python_calls_per_batch'))} |" + (f" error: {r['error']}" if r.get("error") else "")
                  for r in recs]
        lines.append("")
    strong = _load(os.path.join(out, "strong_programs.json")) or []
    if strong:
        lines += ["## Strong-view programs", "", "| program | ATen calls/batch | host ms/batch | wall ms/batch |",
                  "|---|---|---|---|"]
        lines += [f"| {r['program']} | {r['aten_calls_per_batch']} | {r['host_ms_per_batch']:.2f} | "
                  f"{r['wall_ms_per_batch']:.2f} |" for r in strong]
        lines.append("")
    return lines


def group(out):
    """K students from one data pass against K solo runs (the solo row's samples/s is K solo runs' rate)."""
    recs = _load(os.path.join(out, "group_e2e.json")) or []
    if not recs:
        return []
    lines = ["## Several students, one data pass (ResNet34 -> K x ResNet18, cache)", "",
             "| K | samples/s | student-samples/s | vs K solo runs | peak MiB |", "|---|---|---|---|---|"]
    for r in recs:
        if "samples_per_s" not in r:
            lines.append(f"| {r.get('students', 1)} | FAILED: {_first_line(r.get('error'))} | | | |")
            continue
        vs = f"{r['vs_solo_runs']:.2f}x" if r.get("vs_solo_runs") else "-"
        mem = f"{r['peak_memory_mib']:.0f}" if r.get("peak_memory_mib") is not None else "-"
        lines.append(f"| {r.get('students', 1)} | {r['samples_per_s']:.0f} | {r['student_samples_per_s']:.0f} | {vs} | "
                     f"{mem} |")
    return lines + [""]


def main(argv=None):
    out = (argv or sys.argv[1:])[0]
    lines = ["# GPU run", ""] + stages(out) + checks(out)
    lines += rates(out, "resnet32x4 -> resnet8x4 at 32", "cifar_step.json", ["cifar_e2e.json"])
    lines += rates(out, "ResNet34 -> ResNet18 at 224", "r34_step.json", ["r34_e2e_torch.json", "r34_e2e_dali.json"])
    lines += loaders(out) + group(out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
