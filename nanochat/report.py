"""The report card: each stage logs a markdown section; `generate` assembles report.md.

    python -m nanochat.report reset      # new header (date, commit, hardware, versions, code size)
    python -m nanochat.report generate   # <base>/report/report.md, copied to ./report.md (+ ./report_assets/)

Sections live in <base>/report/<slug>.md with a JSON sidecar (<slug>.json) holding the stage column
and the summary metrics that go into the final table.
"""
import datetime
import glob
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time

from nanochat.common import atomic_write, get_base_dir


def subplots(*args, **kwargs):
    """plt.subplots on the headless Agg backend (stages run on servers with no display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(*args, **kwargs)


def close_figure(fig):
    import matplotlib.pyplot as plt
    plt.close(fig)

# Report order; sections not listed here (nor a listed name plus " (...)") follow in the order they were written.
SECTION_ORDER = [
    "Tokenizer training", "Tokenizer evaluation",
    "Base model training", "Base model loss", "Base model evaluation",
    "Midtraining", "Chat evaluation mid",
    "Chat SFT", "Chat evaluation sft",
    "Chat RL", "Chat evaluation rl",
    "Chat DPO", "Chat evaluation dpo",
    "Continual learning",
]
STAGES = ["BASE", "MID", "SFT", "RL", "DPO", "CL"]
OPTIONAL_STAGES = {"DPO"}  # a column only when that stage ran (the speedrun picks RL, DPO or both)


def slugify(section):
    return re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def _run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_info():
    root = _repo_root()
    commit = _run(["git", "-C", root, "rev-parse", "--short", "HEAD"]) or "unknown"
    branch = _run(["git", "-C", root, "rev-parse", "--abbrev-ref", "HEAD"]) or "unknown"
    dirty = bool(_run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"]))
    return {"commit": commit + (" (dirty)" if dirty else ""), "branch": branch}


def hardware_info():
    import psutil
    import torch
    info = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu cores": os.cpu_count(),
        "memory GiB": round(psutil.virtual_memory().total / 2**30, 1),
    }
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        mem = torch.cuda.get_device_properties(0).total_memory / 2**30
        info["gpus"] = f"{len(names)}x {names[0]} ({mem:.0f} GiB)"
    else:
        info["gpus"] = "none"
    return info


def software_info():
    import torch
    info = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("numpy", "tiktoken", "pyarrow"):
        try:
            info[name] = __import__(name).__version__
        except Exception:
            pass
    return info


def code_size():
    """Lines and characters of the repo's own code (tracked files by extension)."""
    root = _repo_root()
    files = _run(["git", "-C", root, "ls-files"]).splitlines()
    if not files:  # not a git checkout: walk the tree
        files = [os.path.relpath(p, root) for ext in ("py", "rs", "sh", "html")
                 for p in glob.glob(f"{root}/**/*.{ext}", recursive=True) if "/.venv/" not in p]
    by_ext, lines, chars = {}, 0, 0
    for f in files:
        ext = os.path.splitext(f)[1]
        if ext not in (".py", ".rs", ".sh", ".html", ".toml", ".md"):
            continue
        try:
            text = open(os.path.join(root, f), encoding="utf-8", errors="replace").read()
        except OSError:
            continue
        n = text.count("\n")
        by_ext[ext] = by_ext.get(ext, 0) + n
        lines += n
        chars += len(text)
    by_type = ", ".join(f"{k} {v}" for k, v in sorted(by_ext.items()))
    return {"files": len(files), "lines": lines, "characters": chars, "lines by type": by_type}


class Report:
    def __init__(self, report_dir):
        self.dir = report_dir
        os.makedirs(report_dir, exist_ok=True)

    def log(self, section, data, stage=None, summary=None, images=None, facts=None):
        """Write one section. data: list of dicts (rendered as `- key: value`) and strings (verbatim).
        stage: the summary column (one of STAGES); summary: {metric: value} for that
        column; images: [(title, png_path)] embedded in the section; facts: {name: number} kept for the
        summary's own lines (e.g. base training's minutes for the time to GPT-2 CORE), not printed."""
        slug = slugify(section)
        lines = [f"## {section}", f"timestamp: {datetime.datetime.now():%Y-%m-%d %H:%M:%S}", ""]
        for item in data or []:
            if isinstance(item, dict):
                lines += [f"- {k}: {_fmt(v)}" for k, v in item.items()]
            elif item:
                lines.append(str(item))
            lines.append("")
        for title, path in images or []:
            lines += [f"![{title}]({os.path.basename(path)})", ""]
        with atomic_write(os.path.join(self.dir, slug + ".md"), "w") as f:
            f.write("\n".join(lines))
        with atomic_write(os.path.join(self.dir, slug + ".json"), "w") as f:
            json.dump({"section": section, "stage": stage, "summary": summary or {}, "facts": facts or {},
                       "time": time.time()}, f)
        return os.path.join(self.dir, slug + ".md")

    def save_plot(self, fig, name):
        """Save a matplotlib figure as a PNG into the report dir and close it; returns its path."""
        path = os.path.join(self.dir, name)
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
        close_figure(fig)
        return path

    def reset(self):
        for p in glob.glob(os.path.join(self.dir, "*")):
            if os.path.isfile(p):
                os.remove(p)
        header = {"start": time.time(), "date": f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}",
                  **{f"git {k}": v for k, v in git_info().items()}}
        lines = ["# nanochat training report", "", f"Generated: {header['date']}", "",
                 "## Environment", "", "### Git"] + [f"- {k}: {v}" for k, v in git_info().items()]
        lines += ["", "### Hardware"] + [f"- {k}: {v}" for k, v in hardware_info().items()]
        lines += ["", "### Software"] + [f"- {k}: {v}" for k, v in software_info().items()]
        lines += ["", "### Code"] + [f"- {k}: {_fmt(v)}" for k, v in code_size().items()]
        with atomic_write(os.path.join(self.dir, "header.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        with atomic_write(os.path.join(self.dir, "header.json"), "w") as f:
            json.dump(header, f)
        print(f"report reset: {self.dir}")

    def _sections(self):
        """(slug, meta) for every logged section, in report order."""
        metas = []
        for p in glob.glob(os.path.join(self.dir, "*.json")):
            slug = os.path.basename(p)[:-5]
            if slug == "header":
                continue
            with open(p) as f:
                metas.append((slug, json.load(f)))
        rank = {s: i for i, s in enumerate(SECTION_ORDER)}
        # "Midtraining (copydrill)" sorts with "Midtraining": a variant sits by its stage, in the order written
        metas.sort(key=lambda sm: (rank.get(sm[1]["section"], rank.get(sm[1]["section"].split(" (")[0], len(rank))),
                                   sm[1]["time"]))
        return metas

    def summary_table(self, sections):
        rows = {}  # metric -> {stage: value}
        for _, meta in sections:
            if meta.get("stage") in STAGES:
                for metric, value in meta["summary"].items():
                    rows.setdefault(metric, {})[meta["stage"]] = value
        if not rows:
            return []
        ran = {stage for vals in rows.values() for stage in vals}
        stages = [s for s in STAGES if s not in OPTIONAL_STAGES or s in ran]
        out = ["| Metric | " + " | ".join(stages) + " |", "|" + "---|" * (len(stages) + 1)]
        for metric, vals in rows.items():
            out.append(f"| {metric} | " + " | ".join(_fmt(vals[s]) if s in vals else "-" for s in stages) + " |")
        return out

    def generate(self, copy_to=None):
        """Assemble report.md from the header, every section and the summary table; returns its path."""
        header = os.path.join(self.dir, "header.md")
        parts = [open(header).read() if os.path.exists(header) else
                 "# nanochat training report\n\n(no header: run `python -m nanochat.report reset` first)\n"]
        sections = self._sections()
        for slug, _ in sections:
            parts.append(open(os.path.join(self.dir, slug + ".md")).read())
        summary = ["## Summary", ""] + self.summary_table(sections) + time_to_core(sections)
        start = None
        if os.path.exists(os.path.join(self.dir, "header.json")):
            with open(os.path.join(self.dir, "header.json")) as f:
                start = json.load(f).get("start")
        if start is not None:
            end = max([m["time"] for _, m in sections] + [start])
            mins = (end - start) / 60
            summary += ["", f"Total wall clock time: {int(mins // 60)}h{int(mins % 60):02d}m"]
        parts.append("\n".join(summary) + "\n")
        text = "\n".join(parts)
        out = os.path.join(self.dir, "report.md")
        with atomic_write(out, "w") as f:
            f.write(text)
        if copy_to:
            # images sit beside the sections; the copy points at a sibling assets folder
            assets = os.path.join(copy_to, "report_assets")
            pngs = glob.glob(os.path.join(self.dir, "*.png"))
            if pngs:
                os.makedirs(assets, exist_ok=True)
                for p in pngs:
                    shutil.copy2(p, assets)
            copied = re.sub(r"!\[([^\]]*)\]\(([^)/]+\.png)\)", r"![\1](report_assets/\2)", text)
            with atomic_write(os.path.join(copy_to, "report.md"), "w") as f:
                f.write(copied)
        return out


GPT2_CORE = 0.2565  # GPT-2 (1.5B)'s CORE in nanochat's leaderboard: the bar its "time to GPT-2" measures


def time_to_core(sections):
    """The summary's "time to GPT-2 CORE" line: base training's wall time when the base model's CORE (the online
    metric; the offline stand-in is not comparable) reaches GPT2_CORE. Nothing when CORE was not measured."""
    core = [m["summary"]["CORE"] for _, m in sections if m.get("stage") == "BASE" and "CORE" in m["summary"]]
    minutes = [m.get("facts", {}).get("training_minutes") for _, m in sections if m["section"] == "Base model training"]
    if not core or not minutes or minutes[-1] is None:
        return []
    took = f"{int(minutes[-1] // 60)}h{int(minutes[-1] % 60):02d}m of base training"
    if core[-1] >= GPT2_CORE:
        return ["", f"Time to GPT-2 CORE ({GPT2_CORE}): {took} (CORE {core[-1]:.4f})"]
    return ["", f"Time to GPT-2 CORE ({GPT2_CORE}): not reached (CORE {core[-1]:.4f} after {took})"]


def get_report():
    return Report(os.path.join(get_base_dir(), "report"))


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "reset":
        get_report().reset()
    elif cmd == "generate":
        path = get_report().generate(copy_to=os.getcwd())
        print(f"report written: {path} (copied to {os.path.join(os.getcwd(), 'report.md')})")
    else:
        sys.exit("usage: python -m nanochat.report reset|generate")
