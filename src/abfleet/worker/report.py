"""The run report: one self-contained HTML file (plotly.js embedded, no network) built from the
study and the export's abfleet-run.json.

Charts come from plotly (kept library, drawn in the browser from embedded data): the trade-off
between refusals and KL with the Pareto front, the long re-score and the chosen trial; the
trials over time; the chosen trial's weight per layer. Tables: before/after, answers before and
after, the chosen parameters, timings and where it ran. The worker writes it beside the export
(`report.html`, listed in the manifest), and `abfleet report` rebuilds it from a run folder.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

import optuna

from abfleet.core.result import completed, pareto_front
from abfleet.render import fmt_judge, fmt_kl, fmt_refusals

NAME = "report.html"
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0; }
td, th { border: 1px solid #ccc; padding: .3em .6em; text-align: left; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.answer { white-space: pre-wrap; max-width: 28em; font-size: .9em; }
.meta { color: #555; }
"""


def build_report(study: optuna.Study, record: dict[str, Any]) -> str:
    """The whole report as one HTML string."""
    trials = completed(study)
    front = pareto_front(trials)
    chosen = (record.get("chosen") or {}).get("trial")
    rescore = study.user_attrs.get("rescore") or {}
    charts = [
        ("Refusals against KL divergence", _tradeoff(trials, front, rescore, chosen)),
    ]
    benchmarks = record.get("benchmarks") or {}
    if benchmarks:  # beside the refusal/KL chart: what the edit cost in capability
        charts.append(
            ("Capability before and after (lm-evaluation-harness)", _capability(benchmarks))
        )
    charts.append(("Trials over time", _over_time(trials)))
    weights = _layer_weights(record, study)
    if weights is not None:
        charts.append(("Ablation weight per layer (chosen trial)", weights))
    body = [
        f"<h1>abfleet run: {_e(record.get('model', {}).get('source', '?'))}</h1>",
        _meta(record, len(trials)),
        "<h2>Before / after (held-out prompts)</h2>",
        _before_after(record),
    ]
    if benchmarks:
        body.append(_capability_table(benchmarks))
    for i, (title, figure) in enumerate(charts):
        body.append(f"<h2>{_e(title)}</h2>")
        body.append(figure.to_html(full_html=False, include_plotlyjs=i == 0, div_id=f"chart{i}"))
    body += [
        "<h2>Answers before and after</h2>",
        _samples(record),
        "<h2>Chosen trial</h2>",
        _params(record),
        "<h2>Timings</h2>",
        _timings(record),
    ]
    title = f"abfleet report: {record.get('study', {}).get('name', '')}"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
        f"<style>{_STYLE}</style></head><body>{''.join(body)}</body></html>\n"
    )


def write_report(study: optuna.Study, record: dict[str, Any], target: Path) -> Path:
    """Write atomically (temp name, then rename)."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_text(build_report(study, record), encoding="utf-8")
    tmp.replace(target)
    return target


def _e(value: Any) -> str:
    return html.escape(str(value))


def _row(cells: list[Any], numeric: set[int] | None = None, tag: str = "td") -> str:
    numeric = numeric or set()
    return (
        "<tr>"
        + "".join(
            f"<{tag}{' class=n' if i in numeric else ''}>{_e(c)}</{tag}>"
            for i, c in enumerate(cells)
        )
        + "</tr>"
    )


def _meta(record: dict[str, Any], n_trials: int) -> str:
    versions = record.get("versions", {})
    study = record.get("study", {})
    chosen = record.get("chosen", {})
    parts = [
        f"study {study.get('name', '?')} ({n_trials} trials complete, {study.get('ended_by', '')})",
        f"chosen trial {chosen.get('trial', '?')}: {chosen.get('reason', '')}",
        f"device {versions.get('device', '?')} on {record.get('host', '?')}",
        f"abfleet {versions.get('abfleet', '?')}, torch {versions.get('torch', '?')}, "
        f"transformers {versions.get('transformers', '?')}",
    ]
    cost = record.get("cost")
    if cost:
        parts.append(f"{cost['price_per_hour']:.2f} $/h, about {cost['usd']:.2f} $ for the run")
    parts += [f"warning: {w}" for w in record.get("warnings") or []]
    return "<p class=meta>" + "<br>".join(_e(p) for p in parts) + "</p>"


def _before_after(record: dict[str, Any]) -> str:
    before, after = record.get("before") or {}, record.get("after") or {}
    tokens = after.get("long_tokens") or before.get("long_tokens")
    judged = "judge" in after or "judge" in before
    head = ["", "refusals", "KL", "degenerate"]
    if tokens:
        head[2:2] = [f"refusals @{tokens} tok"]
        head.append(f"degenerate @{tokens} tok")
    if judged:
        head.append("judge refusal/compliance/degenerate")
    rows = [_row(head, tag="th")]
    lines = [("before", before, "0"), ("after", after, fmt_kl(after.get("kl")))]
    search = record.get("after_search")
    if search:
        # The search applied the edit as deltas; the export merged it into the weights. Both
        # are shown so a rounding difference between them is visible, not hidden.
        lines.append(("after, as searched", search, fmt_kl(search.get("kl"))))
    for label, r, kl in lines:
        cells = [label, fmt_refusals(r.get("refusals"), r.get("n_bad")), kl, r.get("degenerate")]
        if tokens:
            cells[2:2] = [fmt_refusals(r.get("long_refusals"), r.get("n_bad"))]
            cells.append(r.get("long_degenerate", "-"))
        if judged:
            cells.append(fmt_judge(r.get("judge")))
        rows.append(_row(cells, set(range(1, len(cells)))))
    return "<table>" + "".join(rows) + "</table>"


def _capability_table(benchmarks: dict[str, dict[str, Any]]) -> str:
    rows = [_row(["task", "metric", "before", "after", "difference", "examples"], tag="th")]
    for task, r in benchmarks.items():
        rows.append(
            _row(
                [
                    task,
                    r["metric"],
                    f"{r['before']:.3f}",
                    f"{r['after']:.3f}",
                    f"{r['diff']:+.3f}",
                    r["n"],
                ],
                {2, 3, 4, 5},
            )
        )
    return "<table id=capability>" + "".join(rows) + "</table>"


def _capability(benchmarks: dict[str, dict[str, Any]]) -> Any:
    import plotly.graph_objects as go

    tasks = list(benchmarks)
    labels = [f"{t} ({benchmarks[t]['metric']}, n={benchmarks[t]['n']})" for t in tasks]
    fig = go.Figure()
    for key, color in (("before", "#888"), ("after", "#d62728")):
        fig.add_trace(
            go.Bar(
                x=labels,
                y=[benchmarks[t][key] for t in tasks],
                name=key,
                marker={"color": color},
                text=[f"{benchmarks[t][key]:.3f}" for t in tasks],
            )
        )
    fig.update_layout(barmode="group", height=340, margin={"t": 20}, yaxis={"rangemode": "tozero"})
    return fig


def _samples(record: dict[str, Any]) -> str:
    rescore = record.get("rescore") or {}
    before = rescore.get("samples_before") or []
    after = rescore.get("samples_after") or []
    if not before and not after:
        return "<p>No answers were kept (the run had no long re-score).</p>"
    rows = [_row(["prompt", "before", "after"], tag="th")]
    for (prompt, old), (_, new) in zip(before, after, strict=False):
        rows.append(
            f"<tr><td>{_e(prompt)}</td><td class=answer>{_e(old)}</td>"
            f"<td class=answer>{_e(new)}</td></tr>"
        )
    return "<table>" + "".join(rows) + "</table>"


def _params(record: dict[str, Any]) -> str:
    ablation = (record.get("chosen") or {}).get("ablation") or {}
    rows = [_row(["parameter", "value"], tag="th")]
    for key in ("direction_scope", "direction_index"):
        if key in ablation:
            rows.append(_row([key, ablation[key]]))
    for component in ("attn", "mlp"):
        for key, value in (ablation.get(component) or {}).items():
            rows.append(_row([f"{component}.{key}", f"{value:.4g}"], {1}))
    return "<table>" + "".join(rows) + "</table>"


def _timings(record: dict[str, Any]) -> str:
    timings = record.get("timings") or {}
    rows = [_row(["phase", "seconds"], tag="th")]
    rows += [_row([k, v], {1}) for k, v in timings.items()]
    return "<table>" + "".join(rows) + "</table>"


def _tradeoff(
    trials: list[Any], front: list[Any], rescore: dict[str, Any], chosen: int | None
) -> Any:
    import plotly.graph_objects as go

    def trials_trace(shown: list[Any], name: str, mode: str, marker: dict[str, Any]) -> Any:
        return go.Scatter(
            x=[t.values[1] for t in shown],
            y=[t.values[0] for t in shown],
            mode=mode,
            name=name,
            marker=marker,
            text=[f"trial {t.number}" for t in shown],
        )

    fig = go.Figure()
    fig.add_trace(trials_trace(trials, "trials", "markers", {"color": "#bbb", "size": 7}))
    ordered = sorted(front, key=lambda t: t.values[1])
    fig.add_trace(
        trials_trace(ordered, "Pareto front", "lines+markers", {"color": "#1f77b4", "size": 9})
    )
    entries = rescore.get("entries") or {}
    by_number = {t.number: t for t in trials}
    long = [
        (by_number[int(k)], e) for k, e in entries.items() if k.isdigit() and int(k) in by_number
    ]
    if long:
        fig.add_trace(
            go.Scatter(
                x=[t.values[1] for t, _ in long],
                y=[e["refusals"] for _, e in long],
                mode="markers",
                name=f"re-scored @{rescore.get('tokens')} tokens",
                marker={"color": "#ff7f0e", "size": 9, "symbol": "diamond"},
                text=[f"trial {t.number}" for t, _ in long],
            )
        )
    if chosen in by_number:
        t = by_number[chosen]
        y = entries.get(str(chosen), {}).get("refusals", t.values[0])
        fig.add_trace(
            go.Scatter(
                x=[t.values[1]],
                y=[y],
                mode="markers",
                name=f"chosen (trial {chosen})",
                marker={"color": "#d62728", "size": 16, "symbol": "star"},
            )
        )
    fig.update_layout(
        xaxis_title="KL divergence (first answer token, harmless prompts)",
        yaxis_title="refusals (held-out harmful prompts)",
        height=460,
        margin={"t": 20},
    )
    return fig


def _over_time(trials: list[Any]) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(specs=[[{"secondary_y": True}]])
    done = sorted(trials, key=lambda t: t.number)
    for index, name in enumerate(("refusals", "KL")):  # the study's two objectives
        fig.add_trace(
            go.Scatter(
                x=[t.datetime_complete for t in done],
                y=[t.values[index] for t in done],
                mode="markers",
                name=name,
            ),
            secondary_y=index == 1,
        )
        fig.update_yaxes(title_text=name, secondary_y=index == 1)
    fig.update_layout(height=360, margin={"t": 20})
    return fig


def _layer_weights(record: dict[str, Any], study: optuna.Study) -> Any | None:
    import plotly.graph_objects as go

    from abfleet.core.ablation import AblationParams, layer_weight

    ablation = (record.get("chosen") or {}).get("ablation")
    directions = study.user_attrs.get("directions")
    if not ablation or not directions:
        return None
    params = AblationParams.from_dict(ablation)
    n_layers = int(directions["shape"][0]) - 1
    fig = go.Figure()
    for component in ("attn", "mlp"):
        weights = [layer_weight(i, params.component(component)) or 0.0 for i in range(n_layers)]
        fig.add_trace(go.Bar(x=list(range(n_layers)), y=weights, name=component))
    fig.update_layout(
        barmode="group", xaxis_title="layer", yaxis_title="weight", height=320, margin={"t": 20}
    )
    return fig


def load_record(model_dir: Path) -> dict[str, Any]:
    from abfleet.core.export import RUN_FILE

    return json.loads((model_dir / RUN_FILE).read_text(encoding="utf-8"))


def report_for_folder(folder: Path, out: Path | None = None) -> Path:
    """Rebuild the report of a run folder: `abfleet run`'s, or the controller's local copy of a
    box's run (its study backup `study.db` and the downloaded `model/`)."""
    from abfleet.errors import UserError

    db, model = folder / "study.db", folder / "model"
    if not db.is_file() or not (model / "abfleet-run.json").is_file():
        missing = "study.db" if not db.is_file() else "model/abfleet-run.json"
        raise UserError(
            f"{folder} has no {missing}: give a run folder with its study and its exported model "
            "(`abfleet backup` and `abfleet download` bring a box's run home)"
        )
    record = load_record(model)
    storage = optuna.storages.RDBStorage(f"sqlite:///{db.resolve()}")
    study = optuna.load_study(study_name=record["study"]["name"], storage=storage)
    return write_report(study, record, out or folder / NAME)
