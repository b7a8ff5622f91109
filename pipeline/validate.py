"""``rayalign validate``: the config, the DAG and every data file, checked without training."""

from __future__ import annotations

from pipeline.dag import build_dag
from pipeline.spec import PipelineSpec


def validate_pipeline(spec: PipelineSpec) -> list[str]:
    """Raises on the first problem (SpecError, DAGError, DataError); returns one line per data source."""
    from stages.sources import load_records
    from stages.stage import data_sources

    dag = build_dag(spec)
    lines = [f"DAG: {' -> '.join(dag.order)}"]
    for name in dag.order:
        if name not in spec.stages:
            continue
        for field, (data, kind) in data_sources(spec.stages[name]).items():
            loaded = load_records(spec.resolve_path(data.path), kind, format=data.format)  # every record, not just `limit`
            lines.append(f"{name}.{field}: {data.path} [{loaded.format}] {loaded.read} read, "
                         f"{len(loaded.records)} usable {kind} records, skipped {loaded.skipped or 'none'}")
            if data.eval_path:
                held_out = load_records(spec.resolve_path(data.eval_path), kind, format=data.format)
                lines.append(f"{name}.{field}.eval_path: {len(held_out.records)} usable records")
    return lines
