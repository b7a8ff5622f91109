"""The run report: ``<storage>/<name>/report/index.html`` (self-contained) and ``report.md``.

    rayalign report CONFIG          # rebuild it from the store, without training
    from pipeline.report import build_report
    path = build_report(spec)       # -> .../report/index.html

It only reads the store, so it works for a partial run: every node of the DAG is listed with its
status (complete, running, failed, stale: only an artifact of an older config, pending), time and
fingerprint. Then the eval stages' metrics per model (with 95% intervals), accuracy and win-rate
bars, sample responses, each reward model's held-out pairwise accuracy, every stage's training
curves (manifest ``curves``), reward against KL for RL stages (curves ``reward_mean`` and ``kl``,
else any ``*reward*`` and ``*kl*``), and sweep results (``<run>/sweeps/*/results.json`` and
``results.png``).

``index.html`` has its CSS inline and its plots as base64 PNGs (matplotlib, Agg), so it opens
from disk with no server; ``report.md`` links the same PNGs, written to ``report/img/``. A small
inline script writes each image's load status into ``#image-status`` (read by the tests).
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from pipeline.spec import PipelineSpec
from pipeline.report_figures import Figure, Node, STATUS_COLORS, is_finite_number, eval_figures, plot_curves, plot_dag, plot_reward_kl, reward_kl_curves
from pipeline.store import MANIFEST, Artifact, ArtifactStore, now
from stages.remote_storage import RemoteFolder



# --------------------------------------------------------------------------- reading the store


def collect(spec: PipelineSpec, inputs: dict[str, str] | None = None) -> list[Node]:
    """Every node of the DAG with its status and (when there is one) its manifest; ``inputs``: the
    run's ``--input`` folders (the stages after them are fingerprinted against those)."""
    from pipeline.dag import build_dag

    store = ArtifactStore(spec.run_root())
    dag = build_dag(spec)
    try:
        from pipeline.runner import plan

        the_plan = plan(spec, inputs=inputs)
        fingerprints, cached = the_plan.fingerprints, the_plan.cached
    except Exception:  # noqa: BLE001 - e.g. a data file gone: report what the store holds
        fingerprints, cached = {}, {}
    nodes = []
    for name in dag.order:
        kind = spec.stages[name].kind if name in spec.stages else "base"
        fp = fingerprints.get(name)
        artifact: Artifact | None = cached.get(name)
        status, manifest, path = "pending", {}, None
        if artifact is not None:
            status = "external" if artifact.manifest.get("kind") == "external" else "complete"
            manifest, path = artifact.manifest, artifact.path
            if gate_blocks(manifest):
                status = "gated"
        else:
            attempts = store.attempts(name, fp) if fp else []
            partial = attempts[0] / MANIFEST if attempts else None
            if partial is not None and partial.exists():
                try:
                    manifest = json.loads(partial.read_text())
                    status, path = ("failed" if manifest.get("status") == "failed" else "running"), partial.parent
                except json.JSONDecodeError:
                    pass
            if status == "pending" and (latest := store.latest(name)) is not None:
                status, manifest, path = "stale", latest.manifest, latest.path
            if status == "pending" and any(n.name in dag.parents[name].values() and n.status in ("gated", "blocked")
                                           for n in nodes):
                status = "blocked"  # a failed gate upstream stopped it
        nodes.append(Node(name, kind, dict(dag.parents[name]), fp or manifest.get("fingerprint"), status,
                          manifest, path))
    return nodes


def gate_blocks(manifest: dict) -> bool:
    gate = manifest.get("gate") or {}
    return bool(gate) and not gate.get("passed") and not gate.get("ignored")


def gate_note(manifest: dict) -> str:
    """The gate's checks in one line: ``heldout_accuracy >= 0.65 (0.52) failed``."""
    checks = (manifest.get("gate") or {}).get("checks", [])
    return "; ".join(f"{c['condition']} ({'n/a' if c.get('left') is None else format(c['left'], '.4g')}) "
                     f"{'passed' if c.get('passed') else 'failed'}" for c in checks)


def sweep_results(nodes: list[Node]) -> list[dict]:
    """Every swept stage's trial table (its manifest's ``sweep``) and plot (``sweep.png`` beside it)."""
    out = []
    for node in nodes:
        results = node.manifest.get("sweep")
        if not results or node.path is None:
            continue
        png = Path(node.path) / "sweep.png"
        out.append({"name": node.name, "results": results, "png": png.read_bytes() if png.exists() else None})
    return out


# --------------------------------------------------------------------------- tables


def eval_columns(metrics: dict) -> list[tuple[str, str]]:
    """(column key, header) of the eval table, for whatever the models have."""
    columns = []
    for task in dict.fromkeys(t for m in metrics.values() for t in (m.get("tasks") or {})):
        columns.append((f"tasks.{task}", f"{task} acc"))
        for c in dict.fromkeys(c for m in metrics.values() for c in ((m.get("tasks") or {}).get(task, {})
                                                                      .get("categories") or {})):
            columns.append((f"tasks.{task}.{c}", f"{task}/{c}"))
    for key, header in (("reward", "reward"), ("win_rate", "win rate"), ("kl", "KL to ref"), ("length", "length"),
                        ("perplexity", "perplexity"), ("preference", "pref. ranking")):
        if any(m.get(key) for m in metrics.values()):
            columns.append((key, header))
    if any(m.get("few_shot") for m in metrics.values()):
        columns.insert(0, ("few_shot", "k-shot"))
    return columns


def eval_cell(model_metrics: dict, column: str) -> tuple[float | None, str]:
    """(the number, its text) of one cell; the number is the manifest's value, unrounded."""
    if column.startswith("tasks."):
        parts = column.split(".")
        result = (model_metrics.get("tasks") or {}).get(parts[1])
        if result and len(parts) == 3:
            result = (result.get("categories") or {}).get(parts[2])
        if not result:
            return None, "–"
        return result["accuracy"], f"{result['accuracy']:.3f}\n[{result['ci'][0]:.2f}, {result['ci'][1]:.2f}] n={result['n']}"
    if column == "few_shot":
        k = model_metrics.get("few_shot") or 0
        return k, str(k)
    result = model_metrics.get(column)
    if not result:
        return None, "–"
    if column == "reward":
        return result["mean"], f"{result['mean']:.3f}\n± {result['std']:.3f} (std)"
    if column == "win_rate":
        return result["win_rate"], (f"{result['win_rate']:.3f}\n[{result['ci'][0]:.2f}, {result['ci'][1]:.2f}] "
                                    f"W{result['wins']}/T{result['ties']}/L{result['losses']}")
    if column == "kl":
        return result["kl"], f"{result['kl']:.3f}\n[{result['ci'][0]:.2f}, {result['ci'][1]:.2f}]"
    if column == "length":
        return result["mean_tokens"], f"{result['mean_tokens']:.1f} tok\n{result['finished']:.0%} end on eos"
    if column == "perplexity":
        return result["perplexity"], f"{result['perplexity']:.3f}"
    if column == "preference":
        return result["accuracy"], f"{result['accuracy']:.3f}\n[{result['ci'][0]:.2f}, {result['ci'][1]:.2f}] n={result['n']}"
    return None, "–"


def _duration(seconds) -> str:
    if not is_finite_number(seconds):
        return "–"
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f} min"


# --------------------------------------------------------------------------- rendering

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1150px;margin:0 auto;padding:18px 28px 60px}
h1{font-size:24px;margin:8px 0 2px}h2{font-size:19px;border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:34px}
h3{font-size:15px;margin:22px 0 6px}.muted{color:#777;font-size:13px}
table{border-collapse:collapse;margin:8px 0 14px;font-size:13px;background:#fff}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
code{font-size:12px;background:#f0f0f0;padding:1px 4px;border-radius:3px}
.status{color:#fff;border-radius:10px;padding:1px 8px;font-size:12px}
img{max-width:100%;border:1px solid #e4e4e4;background:#fff;margin:6px 0}
pre{white-space:pre-wrap;background:#fff;border:1px solid #e4e4e4;padding:6px;font-size:12px;margin:0}
.samples td{max-width:360px}.ok{color:#2e7d32;font-weight:bold}.bad{color:#c62828;font-weight:bold}
#image-status{display:none}.scroll{overflow-x:auto}.ci{color:#777;font-size:11px}
"""

IMAGE_SCRIPT = """
window.addEventListener('load', function () {
  var status = Array.prototype.map.call(document.images, function (img) {
    return {alt: img.alt, loaded: img.complete && img.naturalWidth > 0, width: img.naturalWidth};
  });
  document.getElementById('image-status').textContent = JSON.stringify(status);
  document.body.setAttribute('data-images', status.every(function (s) { return s.loaded; }) ? 'ok' : 'broken');
});
"""


def _kind(node: Node) -> str:
    """The stage kind, and for RL stages the engine that served their rollouts (and how weights were synced)."""
    engine = node.manifest.get("rollout_engine")
    if not engine:
        return node.kind
    sync = node.manifest.get("sync_method")
    return f"{node.kind} (rollouts on {engine}" + (f", sync {sync})" if sync else ")")


def _e(value) -> str:
    return html.escape(str(value))


def _img(figure: Figure) -> str:
    data = base64.b64encode(figure.png).decode()
    return f'<img alt="{_e(figure.key)}" title="{_e(figure.title)}" src="data:image/png;base64,{data}">'


def render_html(spec: PipelineSpec, nodes: list[Node], dag_figure: Figure, sections: list[dict], sweeps: list[dict]) -> str:
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>rayalign report: {_e(spec.name)}"
           f"</title><style>{CSS}</style></head><body data-images='pending'><main>",
           f"<h1>rayalign report: {_e(spec.name)}</h1>",
           f"<div class='muted'>store <code>{_e(store_label(spec))}</code> · generated {_e(now())} · "
           f"{sum(n.status in ('complete', 'external') for n in nodes)}/{len(nodes)} nodes complete</div>",
           "<h2 id='dag'>Pipeline</h2>", _img(dag_figure),
           "<table id='stages'><tr><th>stage</th><th>kind</th><th>inputs</th><th>status</th><th>fingerprint</th>"
           "<th>started</th><th>time</th></tr>"]
    for node in nodes:
        inputs = ", ".join(f"{role}={p}" for role, p in node.parents.items()) or "–"
        color = STATUS_COLORS.get(node.status, "#757575")
        error = f"<div class='muted'>{_e(node.manifest.get('error', ''))[:300]}</div>" if node.status == "failed" else ""
        if node.manifest.get("gate"):
            error += f"<div class='muted gate'>gate: {_e(gate_note(node.manifest))}</div>"
        out.append(f"<tr data-stage='{_e(node.name)}'><td><b>{_e(node.name)}</b></td><td>{_e(_kind(node))}</td>"
                   f"<td>{_e(inputs)}</td><td><span class='status' style='background:{color}'>{_e(node.status)}</span>"
                   f"{error}</td><td><code>{_e(node.fingerprint or '–')}</code></td>"
                   f"<td>{_e(node.manifest.get('started', '–'))}</td>"
                   f"<td class='num'>{_duration(node.manifest.get('seconds'))}</td></tr>")
    out.append("</table>")
    for section in sections:
        out.append(f"<h2 id='{_e(section['id'])}'>{_e(section['title'])}</h2>")
        out += section["html"]
    if sweeps:
        out.append("<h2 id='sweeps'>Sweeps</h2>")
        for sweep in sweeps:
            out += sweep_html(sweep)
    out.append(f"<pre id='image-status'></pre></main><script>{IMAGE_SCRIPT}</script></body></html>")
    return "\n".join(out)


def eval_section(node: Node, figures: list[Figure]) -> dict:
    metrics = node.manifest.get("metrics") or {}
    info = node.manifest.get("eval") or {}
    columns = eval_columns(metrics)
    parts = [f"<p class='muted'>stage <b>{_e(node.name)}</b> ({_e(node.status)}) · reference <b>{_e(info.get('reference'))}"
             f"</b> · reward model <b>{_e(info.get('reward') or '–')}</b> · engine {_e(info.get('engine'))} · sampling "
             f"<code>{_e(json.dumps(info.get('sampling', {})))}</code> · reused: {_e(', '.join(info.get('reused') or []) or 'none')}"
             f" · {_e(info.get('lm_eval', ''))}</p>",
             f"<div class='scroll'><table class='eval-metrics' data-stage='{_e(node.name)}'><tr><th>model</th>"
             + "".join(f"<th>{_e(h)}</th>" for _, h in columns) + "</tr>"]
    for model, m in metrics.items():
        cells = []
        for key, _ in columns:
            value, text = eval_cell(m, key)
            attr = f" data-value='{value!r}'" if value is not None else ""
            head, _, rest = text.partition("\n")
            rest = f"<br><span class='ci'>{_e(rest)}</span>" if rest else ""
            cells.append(f"<td class='num' data-model='{_e(model)}' data-metric='{_e(key)}'{attr}>"
                         f"<span class='value'>{_e(head)}</span>{rest}</td>")
        out_name = f"{model} (ref)" if model == info.get("reference") else model
        parts.append(f"<tr><td><b>{_e(out_name)}</b></td>{''.join(cells)}</tr>")
    parts.append("</table></div><p class='muted'>Accuracy and ranking: Wilson 95% intervals; win rate: ties (identical "
                 "responses or equal rewards) count half, normal 95% interval; KL: mean over the policy's own samples "
                 "(temperature 1) of log π − log π_ref summed over the response, normal 95% interval.</p>")
    parts += [_img(f) for f in figures]
    samples = info.get("samples") or {}
    if samples:
        parts.append("<h3>Sample responses</h3>")
        rows = list(zip(*[[(model, s) for s in samples[model]] for model in samples]))
        parts.append("<table class='samples'><tr><th>prompt</th>" + "".join(f"<th>{_e(m)}</th>" for m in samples) + "</tr>")
        for row in rows:
            first = row[0][1]
            answer = f"<div class='muted'>answer: {_e(first.get('answer'))}</div>" if first.get("answer") else ""
            cells = []
            for _, s in row:
                mark = "" if s.get("correct") is None else (" <span class='ok'>✓</span>" if s["correct"]
                                                             else " <span class='bad'>✗</span>")
                reward = f"<div class='muted'>reward {s['reward']:.3f}</div>" if is_finite_number(s.get("reward")) else ""
                text = _e(s.get("response")) if s.get("response") else "<span class='muted'>(empty)</span>"
                cells.append(f"<td><pre>{text}</pre>{mark}{reward}</td>")
            parts.append(f"<tr><td><pre>{_e(first.get('prompt'))}</pre>{answer}</td>{''.join(cells)}</tr>")
        parts.append("</table>")
    return {"id": f"eval-{node.name}", "title": f"Evaluation: {node.name}", "html": parts, "figures": figures,
            "node": node}


def reward_section(nodes: list[Node]) -> dict | None:
    """Held-out pairwise accuracy of each reward model (Wilson 95% interval), per task category where known."""
    from stages.evaluate.metrics import wilson_interval

    scored = [n for n in nodes if n.kind == "reward" and "heldout_accuracy" in (n.manifest.get("metrics") or {})]
    if not scored:
        return None
    categories = sorted({key.split("/", 1)[1] for n in scored for key in n.manifest["metrics"]
                         if key.startswith("heldout_accuracy/")})
    header = ["reward model", "held-out pairs", "pairwise accuracy", *(f"accuracy: {c}" for c in categories),
              "mean margin"]
    rows = []
    for node in scored:
        m = node.manifest["metrics"]
        pairs, accuracy = m.get("heldout_pairs") or 0, m["heldout_accuracy"]
        low, high = wilson_interval(round(accuracy * pairs), pairs)
        rows.append([node.name, str(pairs), f"{accuracy:.3f} [{low:.2f}, {high:.2f}]" if pairs else f"{accuracy:.3f}",
                     *(_fmt3(m.get(f"heldout_accuracy/{c}")) for c in categories), _fmt3(m.get("heldout_margin"))])
    note = "Share of held-out pairs the model scores chosen above rejected (chance 0.5; ties count as wrong)."
    parts = ["<table class='reward-models'><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    parts += ["<tr>" + "".join(f"<td data-reward-model='{_e(row[0])}'>{_e(cell)}</td>" for cell in row) + "</tr>"
              for row in rows]
    parts += ["</table>", f"<p class='muted'>{_e(note)} Intervals: Wilson 95%.</p>"]
    markdown = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    markdown += ["| " + " | ".join(row) + " |" for row in rows] + ["", note]
    return {"id": "reward-models", "title": "Reward models", "html": parts, "markdown": markdown, "figures": []}


def _fmt3(value) -> str:
    return f"{value:.3f}" if is_finite_number(value) else "–"


def sweep_html(sweep: dict) -> list[str]:
    results = sweep["results"]
    parts = [f"<h3>{_e(sweep['name'])}: {_e(results.get('metric', ''))} ({_e(results.get('mode', ''))})</h3>"]
    if sweep["png"]:
        parts.append(_img(Figure(f"sweep-{sweep['name']}", f"sweep {sweep['name']}", sweep["png"])))
    trials = results.get("trials") or []
    if trials:
        parts.append(f"<p class='muted'>{len(trials)} trials ({_e(results.get('search'))}, seed "
                     f"{_e(results.get('seed'))}), {_e(results.get('stopped_early', 0))} stopped early by "
                     f"{_e((results.get('scheduler') or {}).get('name'))}; ★ is the stage's output</p>")
        keys = list(dict.fromkeys(k for t in trials for k in (t.get("overrides") or {})))
        parts.append("<table class='sweep'><tr><th>trial</th>" + "".join(f"<th>{_e(k)}</th>" for k in keys)
                     + "<th>status</th><th>value</th></tr>")
        best = (results.get("best") or {}).get("fingerprint")
        for t in trials:
            value = t.get("value")
            mark = " ★" if t.get("fingerprint") == best else ""
            parts.append(f"<tr data-status='{_e(t.get('status'))}'><td><code>{_e(t.get('fingerprint'))}</code>{mark}</td>"
                         + "".join(f"<td>{_e((t.get('overrides') or {}).get(k))}</td>" for k in keys)
                         + f"<td>{_e(t.get('status'))}</td><td class='num'>"
                         + (f"{value:.4g}" if is_finite_number(value) else "–") + "</td></tr>")
        parts.append("</table>")
    return parts


def render_markdown(spec: PipelineSpec, nodes: list[Node], sections: list[dict], sweeps: list[dict],
                    images: dict[str, str]) -> str:
    lines = [f"# rayalign report: {spec.name}", "", f"Store `{store_label(spec)}`, generated {now()}.", "",
             f"![pipeline]({images['dag']})", "", "| stage | kind | inputs | status | fingerprint | time |",
             "|---|---|---|---|---|---|"]
    for node in nodes:
        inputs = ", ".join(f"{r}={p}" for r, p in node.parents.items()) or "–"
        gate = f" (gate: {gate_note(node.manifest)})" if node.manifest.get("gate") else ""
        lines.append(f"| {node.name} | {_kind(node)} | {inputs} | {node.status}{gate} | `{node.fingerprint or '–'}` | "
                     f"{_duration(node.manifest.get('seconds'))} |")
    for section in sections:
        lines += ["", f"## {section['title']}", ""] + section.get("markdown", [])
        node = section.get("node")
        if node is not None and section["id"].startswith("eval-"):
            metrics = node.manifest.get("metrics") or {}
            columns = eval_columns(metrics)
            lines.append("| model | " + " | ".join(h for _, h in columns) + " |")
            lines.append("|---" * (len(columns) + 1) + "|")
            for model, m in metrics.items():
                lines.append(f"| {model} | " + " | ".join(eval_cell(m, k)[1].replace("\n", " ") for k, _ in columns) + " |")
            lines.append("")
            for model, samples in ((node.manifest.get("eval") or {}).get("samples") or {}).items():
                for s in samples[:3]:
                    prompt, response = (str(s.get(k) or "").replace("\n", "⏎") for k in ("prompt", "response"))
                    lines.append(f"- **{model}** `{prompt}` → `{response or '(empty)'}`"
                                 + ("" if s.get("correct") is None else (" ✓" if s["correct"] else " ✗")))
        lines += [f"![{f.key}]({images[f.key]})" for f in section["figures"]]
    for sweep in sweeps:
        lines += ["", f"## Sweep {sweep['name']}", ""]
        key = f"sweep-{sweep['name']}"
        if key in images:
            lines.append(f"![sweep]({images[key]})")
        results = sweep["results"]
        keys = list(dict.fromkeys(k for t in results.get("trials", []) for k in t.get("overrides", {})))
        lines += ["", "| " + " | ".join(keys) + f" | status | {results.get('metric')} |",
                  "|---" * (len(keys) + 2) + "|"]
        best = (results.get("best") or {}).get("fingerprint")
        for t in results.get("trials", []):
            value = t.get("value")
            lines.append("| " + " | ".join(str(t["overrides"].get(k)) for k in keys) + f" | {t.get('status')}"
                         + (" ★" if t.get("fingerprint") == best else "") + " | "
                         + (f"{value:.4g}" if is_finite_number(value) else "–") + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- entry point


def build_report(spec: PipelineSpec, inputs: dict[str, str] | None = None) -> Path:
    """Write ``<run>/report/index.html`` and ``report.md`` from the store; returns the HTML's path."""
    nodes = collect(spec, inputs)
    dag_figure = Figure("dag", "pipeline", plot_dag(nodes))
    sections: list[dict] = []
    for node in nodes:
        if node.kind == "eval" and node.manifest.get("metrics"):
            sections.append(eval_section(node, eval_figures(node)))
    rewards = reward_section(nodes)
    if rewards:
        sections.append(rewards)
    curve_figures, rl_figures = [], []
    for node in nodes:
        curves = node.manifest.get("curves") or {}
        if not any(curves.values()):
            continue
        curve_figures.append(Figure(f"curves-{node.name}", f"{node.name} training curves", plot_curves(node.name, curves)))
        pair = reward_kl_curves(curves)
        if pair:
            rl_figures.append(Figure(f"reward-kl-{node.name}", f"{node.name}: {pair[0]} vs {pair[1]}",
                                     plot_reward_kl(node.name, curves, *pair)))
    if rl_figures:
        sections.append({"id": "rl", "title": "RL: reward against KL", "html": [_img(f) for f in rl_figures],
                         "figures": rl_figures})
    if curve_figures:
        sections.append({"id": "curves", "title": "Training curves", "html": [_img(f) for f in curve_figures],
                         "figures": curve_figures})
    sweeps = sweep_results(nodes)

    out = spec.run_root() / "report"
    (out / "img").mkdir(parents=True, exist_ok=True)
    images = {}
    for figure in [dag_figure] + [f for s in sections for f in s["figures"]]:
        (out / "img" / f"{figure.key}.png").write_bytes(figure.png)
        images[figure.key] = f"img/{figure.key}.png"
    for sweep in sweeps:
        if sweep["png"]:
            (out / "img" / f"sweep-{sweep['name']}.png").write_bytes(sweep["png"])
            images[f"sweep-{sweep['name']}"] = f"img/sweep-{sweep['name']}.png"
    index = out / "index.html"
    _write(index, render_html(spec, nodes, dag_figure, sections, sweeps))
    _write(out / "report.md", render_markdown(spec, nodes, sections, sweeps, images))
    if (uri := spec.storage_uri()) is not None:  # an object store: the report lives beside the artifacts
        RemoteFolder(uri).child("report").upload_tree(out)
    return index


def store_label(spec: PipelineSpec) -> str:
    """Where the store is, for people: the object-store folder (without its options) or the local folder."""
    uri = spec.storage_uri()
    return str(RemoteFolder(uri)) if uri is not None else str(spec.run_root())


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
