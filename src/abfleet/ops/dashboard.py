"""The live view of a run (`abfleet watch`), drawn from one snapshot: pure rendering, no I/O."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from abfleet.render import box_lines, fmt_duration, fmt_kl, fmt_refusals, fmt_usd
from abfleet.worker.rundir import FINAL_STATES


@dataclass
class ViewInfo:
    instance_id: str
    gpu: str
    price_per_hour: float | None
    created_at: float
    run: str
    refreshed_at: float | None = None
    stale_since: float | None = None
    error: str | None = None
    backup: dict[str, Any] | None = None
    spent_usd: float | None = None  # the run's instances, from the ledger's meter
    rate_now: float | None = None  # what they bill at now ($/h; a stopped box: its disk)
    billing: str = "running"  # running, stopped, ended
    budget_usd: float | None = None
    paused: str | None = None  # an interruptible box outbid: since when, what it bills
    moved: str | None = None  # the run moved here off a long pause: what it lost


def gauge(used: float | None, total: float | None, width: int = 18) -> RenderableType:
    if used is None or not total:
        return Text("-")
    return ProgressBar(total=total, completed=min(used, total), width=width)


def render(snap: dict[str, Any] | None, info: ViewInfo, now: float | None = None) -> RenderableType:
    now = now or time.time()
    parts: list[RenderableType] = [_header(snap, info, now)]
    if info.moved:
        parts.append(Text(info.moved, style="bold cyan"))
    if info.paused:
        parts.append(Text(info.paused, style="bold magenta"))
    elif info.stale_since is not None:
        parts.append(
            Text(
                f"STALE: no answer from the box for {fmt_duration(now - info.stale_since, live=True)} ({info.error}); "
                "reconnecting. Figures below are from the last snapshot.",
                style="bold yellow",
            )
        )
    if snap:
        for box, why in (snap.get("unreachable") or {}).items():
            parts.append(
                Text(f"box {box} did not answer ({why}); its workers are not shown", style="yellow")
            )
        parts.append(_tables(snap))
        if len(snap.get("workers", [])) > 0:
            parts.append(workers_table(snap, now))
        tail = snap.get("log_tail", [])[-8:]
        if tail:
            parts.append(
                Panel(
                    Text("\n".join(tail), overflow="ellipsis", no_wrap=True),
                    title="log",
                    title_align="left",
                )
            )
    return Group(*parts)


def _header(snap: dict[str, Any] | None, info: ViewInfo, now: float) -> RenderableType:
    if info.spent_usd is None:
        cost, rate = "-", "not billed by abfleet"
    else:
        cost = fmt_usd(info.spent_usd)
        if info.budget_usd:
            cost += f" of a {fmt_usd(info.budget_usd)} budget"
        rate = f"{info.rate_now or 0:.3f} $/h" + {
            "stopped": " (stopped: disk only)",
            "ended": " (destroyed)",
        }.get(info.billing, "")
    lines = Table.grid(padding=(0, 2))
    lines.add_column()
    lines.add_column()
    if snap:
        t = snap.get("trials", {})
        total = t.get("total") or 0
        done = t.get("complete", 0)
        state = snap.get("state", "?")
        if snap.get("reason"):
            state += f" ({snap['reason']})"
        lines.add_row(Text(f"state {state}", style="bold"), Text(snap.get("detail") or ""))
        bar = ProgressBar(total=max(total, 1), completed=min(done, total), width=40)
        lines.add_row(
            bar,
            Text(
                f"{done}/{total} trials, {t.get('running', 0)} running, {t.get('failed', 0)} failed"
            ),
        )
        eta = snap.get("eta_s")
        median = snap.get("median_trial_s")
        lines.add_row(
            Text(f"ETA {fmt_duration(eta, live=True) if eta is not None else '-'}"),
            Text(f"median {median if median else '-'} s/trial"),
        )
        base = snap.get("baseline")
        if base:
            lines.add_row(
                Text("before"),
                Text(f"refusals {fmt_refusals(base.get('refusals'), base.get('n_bad'))}"),
            )
        for text, style in box_lines(snap.get("box"), now):
            lines.add_row(Text("box", style=f"bold {style}".strip()), Text(text, style=style))
    else:
        lines.add_row(Text("no snapshot yet", style="bold"), Text(""))
    lines.add_row(
        Text(f"{rate}"),
        Text(f"cost so far {cost}, up {fmt_duration(now - info.created_at, live=True)}"),
    )
    age = (
        f"refreshed {fmt_duration(now - info.refreshed_at, live=True)} ago"
        if info.refreshed_at
        else "not refreshed yet"
    )
    backup = info.backup
    if backup:
        age += f"; study backed up {fmt_duration(now - backup['at'], live=True)} ago ({backup.get('complete', 0)} trials)"
    title = f"run {info.run} on {info.instance_id} ({info.gpu})"
    return Panel(lines, title=title, title_align="left", subtitle=age, subtitle_align="right")


def _tables(snap: dict[str, Any]) -> RenderableType:
    pareto = Table(title="Pareto front", title_justify="left", expand=False)
    rows = snap.get("pareto", [])[:8]
    tokens = next((p["long_tokens"] for p in rows if p.get("long_tokens")), None)
    cols = ["trial", "refusals", *([f"@{tokens}"] if tokens else []), "KL", "degen."]
    for col in cols:
        pareto.add_column(col, justify="right")
    for p in rows:
        cells = [str(p["trial"]), fmt_refusals(p["refusals"], p["n_bad"])]
        if tokens:
            cells.append(fmt_refusals(p.get("long_refusals"), p["n_bad"]))
        pareto.add_row(*cells, fmt_kl(p["kl"]), str(p["degenerate"]))
    side = Table.grid(padding=(0, 1))
    side.add_column()
    side.add_column()
    side.add_column()
    boxes = len(snap.get("boxes", [])) > 1
    for g in snap.get("gpus", []):
        total_gb = (g.get("mem_total_mb") or 0) / 1024
        used_gb = (g.get("mem_used_mb") or 0) / 1024
        side.add_row(
            (f"{g['box']} " if boxes else "") + f"GPU {g['index']} {g['name']}",
            gauge(g.get("util"), 100),
            f"{g.get('util') or 0:.0f}% {g.get('temp_c') or 0:.0f}C",
        )
        side.add_row("  memory", gauge(used_gb, total_gb), f"{used_gb:.0f}/{total_gb:.0f} GB")
    if not snap.get("gpus"):
        side.add_row("GPU", Text("none (CPU)"), "")
    disk = snap.get("disk") or {}
    if disk:
        used = disk["total_gb"] - disk["free_gb"]
        side.add_row(
            "disk",
            gauge(used, disk["total_gb"]),
            f"{disk['free_gb']:.0f} GB free of {disk['total_gb']:.0f}",
        )
    out = snap.get("output", {})
    if out.get("exported"):
        side.add_row(
            "model",
            Text("exported", style="green"),
            f"{out['total_bytes'] / 1e9:.2f} GB, {len(out['files'])} files",
        )
    push = out.get("push") or {}
    if push.get("url") or push.get("error"):
        ok = bool(push.get("url"))
        side.add_row(
            "hub",
            Text("pushed" if ok else "push failed", style="green" if ok else "red"),
            push.get("url") or push.get("error", ""),
        )
    grid = Table.grid(padding=(0, 4))
    grid.add_column()
    grid.add_column()
    grid.add_row(pareto, side)
    return grid


def _worker_state(w: dict[str, Any]) -> str:
    """A worker that ended (done, stopped, failed) is expected to be gone; only one that should
    still run and does not is dead."""
    if w["alive"] or w["state"] in FINAL_STATES:
        return str(w["state"])
    return f"[red]dead[/] {w['state']}"


def workers_table(snap: dict[str, Any], now: float) -> RenderableType:
    table = Table(title="workers", title_justify="left")
    for col in (
        "#",
        "box",
        "host",
        "GPU",
        "state",
        "trial",
        "running for",
        "heartbeat",
        "done here",
    ):
        table.add_column(col)
    beats = snap.get("heartbeats", {})
    for w in snap.get("workers", []):
        current = w.get("current_trial")
        beat = beats.get(str(current)) if current is not None else None
        running_for = (
            fmt_duration(now - w["current_trial_started"], live=True)
            if current is not None and w.get("current_trial_started")
            else "-"
        )
        table.add_row(
            str(w["index"]),
            str(w.get("box") or "-"),
            str(w.get("host") or "-"),
            str(w.get("gpu") if w.get("gpu") is not None else (w.get("device") or "-")),
            _worker_state(w),
            str(current) if current is not None else "-",
            running_for,
            f"{fmt_duration(now - beat, live=True)} ago" if beat else "-",
            str(w.get("trials_here", 0)),
        )
    return table
