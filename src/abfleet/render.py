"""Tables shown to the user: trials, the Pareto front, before/after. Raw counts, never ratios."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def fmt_kl(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def fmt_refusals(k: int | None, n: int | None) -> str:
    return "-" if k is None else f"{k}/{n}"


def fmt_duration(seconds: float | None, live: bool = False) -> str:
    """1h05m; below an hour 12m03s in live views (seconds matter there), else 0h12m."""
    if seconds is None:
        return "-"
    total = max(0, int(seconds))
    h, m, s = total // 3600, total % 3600 // 60, total % 60
    if live and not h:
        return f"{m}m{s:02d}s"
    return f"{h}h{m:02d}m"


def fmt_judge(verdicts: dict[str, int] | None) -> str:
    """refusal/compliance/degenerate counts of a judge, e.g. 3/95/2."""
    if not verdicts:
        return "-"
    return "/".join(str(verdicts.get(k, 0)) for k in ("refusal", "compliance", "degenerate"))


def _long_columns(rows: list[dict[str, Any]]) -> tuple[int | None, bool]:
    """The long re-score's answer length if any row has one, and whether a judge ran."""
    tokens = next((r["long_tokens"] for r in rows if r.get("long_tokens")), None)
    return tokens, any(r.get("judge") for r in rows)


def pareto_table(
    rows: list[dict[str, Any]], chosen: int | None = None, title: str = "Pareto front"
) -> Table:
    tokens, judged = _long_columns(rows)
    table = Table(title=title, title_justify="left")
    table.add_column("trial", justify="right")
    table.add_column("refusals", justify="right")
    if tokens:
        table.add_column(f"@{tokens} tok", justify="right")
    table.add_column("KL", justify="right")
    table.add_column("degenerate", justify="right")
    if tokens:
        table.add_column(f"@{tokens} tok", justify="right")
    if judged:
        table.add_column("judge r/c/d", justify="right")
    detailed = any("params" in r for r in rows)  # a run's own rows; a snapshot has workers
    workers = not detailed and any(r.get("worker") for r in rows)
    if detailed:
        table.add_column("s", justify="right")
        table.add_column("direction")
    if workers:
        table.add_column("worker", justify="right")
    for r in rows:
        p = r.get("params", {})
        scope = p.get("direction_scope", "")
        where = (
            f"global @{p['direction_index']:.1f}"
            if scope == "global" and "direction_index" in p
            else scope
        )
        mark = " *" if chosen is not None and r["trial"] == chosen else ""
        cells = [f"{r['trial']}{mark}", fmt_refusals(r["refusals"], r["n_bad"])]
        if tokens:
            cells.append(fmt_refusals(r.get("long_refusals"), r["n_bad"]))
        cells += [fmt_kl(r["kl"]), str(r.get("degenerate", "-"))]
        if tokens:
            cells.append(str(r.get("long_degenerate", "-")))
        if judged:
            cells.append(fmt_judge(r.get("judge")))
        if detailed:
            cells += [f"{r.get('seconds', 0):.1f}", where]
        if workers:
            cells.append(str(r.get("worker") or "-"))
        table.add_row(*cells)
    return table


def before_after_table(before: dict[str, Any], after: dict[str, Any]) -> Table:
    tokens, judged = _long_columns([before, after])
    table = Table(title="Before / after (held-out prompts)", title_justify="left")
    table.add_column("")
    table.add_column("refusals", justify="right")
    if tokens:
        table.add_column(f"refusals @{tokens} tok", justify="right")
    table.add_column("KL", justify="right")
    table.add_column("degenerate", justify="right")
    if tokens:
        table.add_column(f"degenerate @{tokens} tok", justify="right")
    if judged:
        table.add_column("judge r/c/d", justify="right")
    for label, row, kl in (("before", before, "0"), ("after", after, fmt_kl(after["kl"]))):
        cells = [label, fmt_refusals(row["refusals"], row["n_bad"])]
        if tokens:
            cells.append(fmt_refusals(row.get("long_refusals"), row["n_bad"]))
        cells += [kl, str(row["degenerate"])]
        if tokens:
            cells.append(str(row.get("long_degenerate", "-")))
        if judged:
            cells.append(fmt_judge(row.get("judge")))
        table.add_row(*cells)
    return table


def sizing_table(plan: Any) -> Table:
    table = Table(title=f"Sizing for {plan.model}", title_justify="left", show_header=False)
    table.add_column("figure", style="bold")
    table.add_column("value", justify="right")
    table.add_column("why")
    values = {
        "parameters": f"{plan.params / 1e9:.2f}B",
        "weights": f"{plan.weights_gb:.1f} GB",
        "disk": f"{plan.disk_gb} GB",
        "host RAM": f"{plan.host_ram_gb:.0f} GB",
        "GPU memory": f"{plan.gpu_memory_gb:.1f} GB",
        "GPU": f"{plan.gpu_count}x {plan.gpu}" if plan.gpu else "none",
    }
    for reason in plan.reasons:
        key, _, why = reason.partition(": ")
        table.add_row(key, values.get(key, ""), why)
    return table


def quantization_table(plan: Any) -> Table:
    """The cheapest fitting option at each quantization the search can run at."""
    table = Table(title="Cheapest fit per quantization", title_justify="left")
    for name in ("quantization", "GPU memory", "GPU", "$/h", "est. job $"):
        table.add_column(name, justify="left" if name in ("quantization", "GPU") else "right")
    for quantization, best in plan.by_quantization.items():
        mark = " (this plan)" if quantization == plan.quantization else ""
        if best is None:
            table.add_row(quantization + mark, "", "nothing in the catalog holds it", "", "")
            continue
        table.add_row(
            quantization + mark,
            f"{best['gpu_memory_gb']:.1f} GB",
            f"{best['count']}x {best['gpu']}",
            f"{best['price_per_hour']:.2f}",
            f"{best['est_job_cost']:.1f}",
        )
    return table


def fmt_usd(value: float) -> str:
    """Dollars: cents, or four decimals for the fractions of a cent a short test run costs."""
    return f"{value:.2f} $" if value >= 0.01 or value == 0 else f"{value:.4f} $"


def box_plan_line(box: dict[str, Any], now: float | None = None) -> str:
    """What a box whose work is over will do to itself, and when (from its snapshot)."""
    import time

    left = max(0.0, box["acts_at"] - (now or time.time()))
    when = time.strftime("%H:%M:%S", time.localtime(box["acts_at"]))
    return (
        f"{box.get('why') or 'work over'}: the box {box['action']}s itself at {when} "
        f"(in {fmt_duration(left, live=True)}); `abfleet download` first if you want the model"
    )


def box_lines(box: dict[str, Any] | None, now: float | None = None) -> list[tuple[str, str]]:
    """The box guardian's plan or trouble, as (text, style) lines for status, progress, watch."""
    import time

    if not box:
        return []
    now = now or time.time()
    iid = box.get("instance_id") or "ID"
    guard = box.get("guardian")
    lines: list[tuple[str, str]] = []
    if box.get("error"):
        since = time.strftime("%H:%M", time.localtime(box.get("failing_since") or now))
        retry = max(0.0, (box.get("next_try_at") or now) - now)
        lines.append(
            (
                f"{box.get('why') or 'work over'}, self-{box.get('action') or 'stop'} failing "
                f"since {since}: {box['error']} (attempt {box.get('attempts')}, next in "
                f"{fmt_duration(retry, live=True)}); it bills its full rate until then: "
                f"`abfleet stop {iid}` (or `abfleet destroy {iid}`) ends it from here",
                "red",
            )
        )
    elif box.get("action") and box.get("acts_at"):
        lines.append((box_plan_line(box, now), ""))
    elif guard and guard.get("phase") in ("kept", "waiting") and guard.get("detail"):
        lines.append((f"box: {guard['detail']}", "yellow"))
    if box.get("budget_reached"):
        lines.append(("budget reached: the workers end and export the best trial so far", "yellow"))
    if guard is None:
        lines.append(
            (
                "no guardian has run on this box (set up by an older abfleet?): it will not stop "
                f"itself; `abfleet stop {iid}` when its work is over",
                "red",
            )
        )
    elif not guard.get("alive") and guard.get("phase") != "done":
        lines.append(
            (
                f"the box's guardian is not running: it will not stop itself; `abfleet stop {iid}` "
                "when its work is over",
                "red",
            )
        )
    return lines
