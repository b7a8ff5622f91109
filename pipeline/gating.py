"""Quality gates in a run: check a stage's ``gate:`` against its artifact's metrics, record the outcome
in its manifest, and say what a failed gate blocks. The conditions themselves are ``stages.gates``.

A gate is checked whenever the run has the stage's artifact: freshly trained, taken from the store, or
an ``--only`` stage's upstream. It is not part of the fingerprint (it changes what runs next, not
what the stage computes), so raising a threshold re-checks a stored artifact without retraining it.
"""

from __future__ import annotations

from pipeline.spec import PipelineSpec
from pipeline.store import Artifact, ArtifactStore
from stages.gates import GateResult, evaluate_gate
from stages.log import log


def gate_outcome(spec: PipelineSpec, node: str, artifact: Artifact) -> GateResult | None:
    """The stage's gate checked on its artifact's metrics; None when the stage has no gate."""
    config = spec.stages.get(node)
    if config is None or not config.gate:
        return None
    metrics = artifact.manifest.get("metrics") or {}
    return evaluate_gate(config.gate, lambda metric: config.gate_value(metrics, metric.name, metric.model))


def check_gate(spec: PipelineSpec, node: str, artifact: Artifact, store: ArtifactStore, ignore: bool) -> list[str]:
    """Check and record a stage's gate; returns the failed checks that block its downstream stages
    (empty when it passes, has no gate, or ``ignore``)."""
    if artifact.manifest.get("kind") == "external":
        if spec.stages.get(node) is not None and spec.stages[node].gate:
            log(f"{node}: gate not checked: --input {artifact.path} has no metrics")
        return []
    result = gate_outcome(spec, node, artifact)
    if result is None:
        return []
    record = {**result.as_dict(ignored=ignore), "conditions": list(spec.stages[node].gate)}
    if artifact.manifest.get("gate") != record:
        try:
            store.record_gate(artifact, record)
        except OSError as err:  # a read-only store: the outcome still decides this run
            log(f"{node}: could not record the gate outcome in {artifact.path}: {err}")
    if result.passed:
        values = ", ".join(f"{c.condition} ({c.left:.4g})" for c in result.checks)
        log(f"{node}: gate passed: {values}")
        return []
    failures = result.failures()
    if ignore:
        log(f"{node}: gate failed, ignored (--ignore-gates): {'; '.join(failures)}")
        return []
    log(f"{node}: gated: {'; '.join(failures)}")
    return failures


def gate_failure_message(gated: dict[str, list[str]], blocked: dict[str, str], artifacts: dict[str, Artifact]) -> str:
    lines = []
    for node, failures in gated.items():
        stopped = [n for n, by in blocked.items() if by == node]
        lines.append(f"the gate of stage {node!r} failed: {'; '.join(failures)}. "
                     f"Not run: {', '.join(stopped) or 'nothing downstream in this run'}. "
                     f"Its artifact is kept at {artifacts[node].path}")
    return "\n".join(lines) + "\nRerun with --ignore-gates to run the downstream stages anyway."
