"""What the benchmark shows: header, tables, targets, JSON, PNG plots, progress bar.

Nothing here measures; everything here is computed from the :class:`Result` list
of one run, so a ratio in the targets section always compares figures of the
same run, same frame, same machine. No figure is written down in advance: the
goals are the issue's ratios, the values are measured.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from sharedexec.bench.memory import SHM_DIR, kernel_has_pss_shmem
from sharedexec.bench.runner import Result

# ---------------------------------------------------------------------------
# Units


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "-"
    if abs(b) >= 1e9:
        return f"{b / 1e9:.2f} GB"
    return f"{b / 1e6:.0f} MB"


# ---------------------------------------------------------------------------
# Header: machine, versions, date


def _version(name: str) -> str:
    try:
        module = importlib.import_module(name)
    except ImportError:
        return "not installed"
    except Exception as exc:  # sharedexec while it is being written
        return f"import failed ({type(exc).__name__})"
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(module, "__version__", "unknown")) + " (not installed, from source)"


def environment(start_method: str, command: str) -> dict[str, Any]:
    """Machine, versions and date, for the header and the JSON."""
    import psutil

    try:
        st = os.statvfs(SHM_DIR)
        shm = {"total_bytes": st.f_blocks * st.f_frsize, "free_bytes": st.f_bavail * st.f_frsize}
    except OSError:
        shm = None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cores": os.cpu_count(),
            "usable_cores": usable,
            "ram_bytes": psutil.virtual_memory().total,
            "shm": shm,
        },
        "versions": {
            "python": platform.python_version(),
            **{n: _version(n) for n in ("pandas", "numpy", "pyarrow", "joblib", "sharedexec", "ray")},
        },
        "start_method": start_method,
        "pss_shmem": sys.platform.startswith("linux") and kernel_has_pss_shmem(),
        "command": command,
    }


def print_header(env: dict[str, Any], title: str, out: TextIO) -> None:
    m = env["machine"]
    shm = m["shm"]
    shm_text = f", {SHM_DIR} {fmt_bytes(shm['free_bytes'])} free of {fmt_bytes(shm['total_bytes'])}" if shm else ""
    print(f"{title} -- {env['date']}", file=out)
    print(f"command:  {env['command']}", file=out)
    print(
        f"machine:  {m['platform']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"{fmt_bytes(m['ram_bytes'])} RAM{shm_text}",
        file=out,
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()), file=out)
    print(
        f"workers start with: {env['start_method']} (joblib: loky; fork global: fork; Ray: its own)\n"
        "memory:   peak extra over a warm, idle pool = sum over the process tree of "
        f"(Pss - Pss_Shmem) + bytes used in {SHM_DIR}, sampled every 20 ms (never RSS)",
        file=out,
    )
    if not env["pss_shmem"]:
        print(
            "          this kernel reports no Pss_Shmem: Pss is used instead, so /dev/shm pages that "
            "processes map count twice (once mapped, once in /dev/shm)",
            file=out,
        )


# ---------------------------------------------------------------------------
# Tables


def _status(r: Result) -> str:
    if r.status != "ok":
        return r.status
    return "ok" if r.correct else "FAIL"


def _note(r: Result) -> str:
    left = f"LEFT {fmt_bytes(r.shm_left_bytes)} in {SHM_DIR} after the run" if r.shm_left_bytes > (2 << 20) else ""
    if r.status != "ok":
        return "; ".join(p for p in (r.reason, left) if p)
    parts = [r.note, left]
    if r.stats:  # sharedexec's own counters, in short: did this run publish, and how?
        s = r.stats
        parts.append(
            f"{s.get('publications', 0)} publication(s), {fmt_bytes(s.get('bytes_shared', 0))} shared, "
            f"{fmt_bytes(s.get('bytes_pickled', 0))} pickled"
        )
    return "; ".join(p for p in parts if p)


def print_table(results: Sequence[Result], title: str, out: TextIO) -> None:
    """One line per approach: tasks, wall, per task, first result, peak extra memory."""
    head = ("approach", "tasks", "wall", "per task", "first", "peak extra", "x frame", "result", "note")
    rows = []
    for r in results:
        ratio = f"{r.peak_extra_bytes / r.frame_bytes:.2f}" if r.peak_extra_bytes is not None and r.frame_bytes else "-"
        rows.append(
            (
                r.label,
                str(r.tasks) if r.status == "ok" else "-",
                fmt_seconds(r.wall_s),
                fmt_seconds(r.per_task_s),
                fmt_seconds(r.first_s),
                fmt_bytes(r.peak_extra_bytes),
                ratio,
                _status(r),
                _note(r),
            )
        )
    widths = [max(len(x[k]) for x in (head, *rows)) for k in range(len(head) - 1)]
    print(f"\n{title}", file=out)
    for line in (head, *rows):
        cells = [c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(line, widths))]
        print("  " + "  ".join(cells) + "  " + line[-1], file=out)


def print_sweep(results: Sequence[Result], x: str, y: str, title: str, out: TextIO) -> None:
    """A grid: one line per approach and string kind, one column per x value."""
    xs = sorted({getattr(r, x) for r in results})
    lines: dict[str, dict[Any, str]] = {}
    for r in results:
        value = getattr(r, y)
        cell = fmt_bytes(value) if y.endswith("bytes") else fmt_seconds(value)
        lines.setdefault(f"{r.label} ({r.string_kind})", {})[getattr(r, x)] = cell if r.status == "ok" else r.status
    width = max([len(k) for k in lines] + [8])
    print(f"\n{title}", file=out)
    heads = [fmt_bytes(v) if x.endswith("bytes") else str(v) for v in xs]
    print("  " + " " * width + "".join(f"{h:>12}" for h in heads), file=out)
    for name, cells in lines.items():
        print("  " + name.ljust(width) + "".join(f"{cells.get(v, ''):>12}" for v in xs), file=out)


# ---------------------------------------------------------------------------
# Targets


SHAREDEXEC_KEYS = ("sharedexec", "pool-shared", "joblib-sharedexec")
# Peak extra memory of 8 workers holding the frame at once, / the frame: with
# strings="arrow" no worker builds Python strings, so it is the shared copy alone.
MEMORY_GOALS = {**dict.fromkeys(SHAREDEXEC_KEYS, 1.3), "sharedexec-arrow-strings": 1.1}


@dataclass
class Target:
    what: str
    string_kind: str
    goal: str
    value: float | None
    status: str  # PASS | MISS | n/a | info | not judged (a --quick run)
    why: str = ""


def _ok(r: Result | None) -> bool:
    return r is not None and r.status == "ok" and bool(r.correct)


def _ratio_target(what: str, kind: str, goal: float, num: Result | None, den: Result | None, missing: str) -> Target:
    """``num.per_task / den.per_task >= goal``, or n/a saying which side is missing."""
    if not (_ok(num) and _ok(den)):
        bad = [r for r in (num, den) if not _ok(r)]
        why = "; ".join(f"{r.label}: {r.reason or _status(r)}" for r in bad if r is not None) or missing
        return Target(what, kind, f">= {goal:g}x", None, "n/a", why)
    value = num.per_task_s / den.per_task_s
    return Target(what, kind, f">= {goal:g}x", value, "PASS" if value >= goal else "MISS")


def compute_targets(results: Sequence[Result], workers: int) -> list[Target]:
    """The issue's targets, from the figures of this run."""
    targets = []
    kinds = list(dict.fromkeys(r.string_kind for r in results))
    for kind in kinds:
        main = {r.approach: r for r in results if r.string_kind == kind and r.task == "task_len" and r.workers == workers and r.phase == "main"}
        for sx in SHAREDEXEC_KEYS:
            if sx not in main or main[sx].status == "skipped":
                continue
            label = main[sx].label
            targets.append(_ratio_target(f"{label} vs stdlib, per task", kind, 300, main.get("stdlib"), main[sx], "stdlib not run"))
            goal = 20 if kind == "object" else 3
            targets.append(_ratio_target(f"{label} vs joblib default, per task", kind, goal, main.get("joblib"), main[sx], "joblib not run"))
            ray = main.get("ray")
            if ray is not None and ray.status == "unavailable":
                targets.append(Target(f"{label} vs Ray, per task", kind, "", None, "n/a", ray.reason))
            else:
                targets.append(_ratio_target(f"{label} vs Ray, per task", kind, 5 if kind == "object" else 1, ray, main[sx], "ray not run"))
        eight = {r.approach: r for r in results if r.string_kind == kind and r.phase == "workers" and r.workers == 8}
        for sx, goal in MEMORY_GOALS.items():
            r = eight.get(sx)
            if r is None:
                continue
            what = f"{r.label} peak extra memory, 8 workers at once, / frame"
            if _ok(r) and r.peak_extra_bytes is not None:
                value = r.peak_extra_bytes / r.frame_bytes
                targets.append(Target(what, kind, f"<= {goal:g}x", value, "PASS" if value <= goal else "MISS"))
            else:
                targets.append(Target(what, kind, f"<= {goal:g}x", None, "n/a", r.reason or _status(r)))
        std = eight.get("stdlib")
        if _ok(std) and std.peak_extra_bytes is not None:
            targets.append(
                Target("stdlib peak extra memory, 8 workers at once, / frame (for comparison)", kind, "", std.peak_extra_bytes / std.frame_bytes, "info")
            )
    return targets + _first_result_targets(results, workers)


def _first_result_targets(results: Sequence[Result], workers: int) -> list[Target]:
    """The first result after publishing, object strings against Arrow
    strings: what a column of Python strings adds to a first task."""
    first = {
        (r.approach, r.string_kind): r
        for r in results
        if r.task == "task_len" and r.workers == workers and r.phase == "main" and r.approach in SHAREDEXEC_KEYS
    }
    targets = []
    for sx in SHAREDEXEC_KEYS:
        obj, arrow = first.get((sx, "object")), first.get((sx, "arrow"))
        if obj is None or arrow is None or "skipped" in (obj.status, arrow.status):
            continue
        what = f"{obj.label} first result, object / Arrow strings"
        if _ok(obj) and _ok(arrow):
            value = obj.first_s / arrow.first_s
            targets.append(Target(what, "object", "<= 1.5x", value, "PASS" if value <= 1.5 else "MISS"))
        else:
            targets.append(Target(what, "object", "<= 1.5x", None, "n/a", obj.reason or arrow.reason or "failed"))
    return targets


def print_targets(targets: Iterable[Target], caveat: str, out: TextIO) -> None:
    print("\ntargets (ratios of figures measured in this run)", file=out)
    if caveat:
        print(f"  note: {caveat}", file=out)
    rows = list(targets)
    if not rows:
        print("  none computed: no approach of the targets ran", file=out)
        return
    width = max(len(t.what) for t in rows)
    for t in rows:
        value = f"{t.value:,.2f}x" if t.value is not None else "-"
        why = f"  ({t.why})" if t.why else ""
        print(f"  {t.string_kind:<6}  {t.what.ljust(width)}  {t.goal:>8}  {value:>10}  {t.status}{why}", file=out)


# ---------------------------------------------------------------------------
# JSON and plots


def write_json(path: str, env: dict[str, Any], args: dict[str, Any], frames: dict[str, str], results: Sequence[Result], targets: Sequence[Target]) -> None:
    doc = {
        **env,
        "arguments": args,
        "frames": frames,
        "results": [r.as_dict() for r in results],
        "targets": [t.__dict__ for t in targets],
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=2, default=str)
        f.write("\n")


def _figure(ncols: int = 1) -> Any:
    # matplotlib's object API with the Agg canvas: no pyplot, no GUI backend, no global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5 * ncols, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_main(path: str, results: Sequence[Result], title: str) -> None:
    """Bars per approach: time per task (trivial task) and peak extra memory (reading task)."""
    ok = [r for r in results if r.status == "ok" and r.phase == "main"]
    fig = _figure(2)
    panels = (("task_len", "per_task_s", "time per task (s, log), task len(df) + i"), ("task_touch", "peak_extra_bytes", "peak extra memory (GB), task reading every column"))
    axes = fig.subplots(1, 2)
    for ax, (task, field_, xlabel) in zip(axes, panels):
        chosen = [r for r in ok if r.task == task] or [r for r in ok if r.task == "task_len"]
        labels = list(dict.fromkeys(r.label for r in chosen))
        kinds = list(dict.fromkeys(r.string_kind for r in chosen))
        height = 0.8 / max(len(kinds), 1)
        for k, kind in enumerate(kinds):
            got = {r.label: getattr(r, field_) for r in chosen if r.string_kind == kind}
            ys = [i + k * height for i, lab in enumerate(labels) if got.get(lab) is not None]
            xs = [got[lab] for lab in labels if got.get(lab) is not None]
            if field_.endswith("bytes"):
                xs = [x / 1e9 for x in xs]
            ax.barh(ys, xs, height=height, label=f"{kind} strings")
        ax.set_yticks([i + 0.4 - height / 2 for i in range(len(labels))], labels, fontsize=8)
        ax.invert_yaxis()
        if field_ == "per_task_s":
            ax.set_xscale("log")
        elif chosen:
            ax.axvline(max(r.frame_bytes for r in chosen) / 1e9, color="grey", linestyle=":", label="frame")
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120)


def plot_sweep(path: str, results: Sequence[Result], x: str, y: str, xlabel: str, ylabel: str, title: str, frame_bytes: float | None = None) -> None:
    """One line per approach and string kind."""
    fig = _figure()
    ax = fig.subplots()
    lines: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        value = getattr(r, y)
        if r.status == "ok" and value is not None:
            xv = r.frame_bytes / 1e6 if x == "frame_bytes" else getattr(r, x)
            lines.setdefault(f"{r.label} ({r.string_kind})", []).append((xv, value / 1e9 if y.endswith("bytes") else value))
    for name, points in lines.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    if frame_bytes:
        ax.axhline(frame_bytes / 1e9, color="grey", linestyle=":", label="frame")
        ax.axhline(1.3 * frame_bytes / 1e9, color="grey", linestyle="--", label="1.3 x frame")
    ax.set_xscale("log", base=2 if x == "workers" else 10)
    if x == "workers":
        ticks = sorted({p[0] for points in lines.values() for p in points})
        ax.set_xticks(ticks, [str(t) for t in ticks])
    if not y.endswith("bytes"):
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------
# Progress


class Progress:
    """A tqdm bar on stderr, or plain lines every 10 % where tqdm is not installed."""

    def __init__(self, total: int, desc: str):
        self.total, self.done, self._shown = max(total, 1), 0, -1
        self.desc = desc
        try:
            from tqdm import tqdm
        except ImportError:
            self._bar = None
        else:
            self._bar = tqdm(total=self.total, desc=desc, unit="task", file=sys.stderr, leave=False, dynamic_ncols=True)

    def describe(self, desc: str) -> None:
        self.desc = desc
        if self._bar is not None:
            self._bar.set_description(desc, refresh=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        tenth = 10 * self.done // self.total
        if tenth != self._shown:
            self._shown = tenth
            print(f"[{10 * tenth:3d}%] {self.desc}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
