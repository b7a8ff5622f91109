"""The ``rayalign`` command.

    rayalign run CONFIG [--only STAGE[,STAGE]] [--force STAGE] [--input STAGE=PATH] [--set KEY=VALUE]
                        [--no-wait] [--allow-stale-upstream] [--ignore-gates]
    rayalign validate CONFIG     check the config and read every data file completely
    rayalign plan CONFIG         print the DAG, which stages are cached, and why the others are stale
    rayalign verify CONFIG       check the stored artifacts' files against their recorded sha256
    rayalign report CONFIG       rebuild <storage>/<name>/report/index.html from the store (no training)
    rayalign submit CONFIG --address http://HEAD:8265 [--no-wait] [--only STAGE[,STAGE]]   run it as a Ray job
    rayalign jobs list|status|logs|stop [JOB] [--address URL]       rayalign's jobs on that cluster
    rayalign k8s CONFIG [-o FILE]                                   render a KubeRay RayJob
    rayalign sweep CONFIG [--stage STAGE]                           Ray Tune sweep of one stage
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from pipeline.cluster import set_verbosity

    set_verbosity(args.verbose)  # before anything heavy is imported or Ray starts
    from pipeline.dag import DAGError
    from pipeline.runner import RunError
    from pipeline.spec import SpecError

    try:
        return args.handler(args)
    except (SpecError, DAGError, RunError, ValueError, FileNotFoundError) as err:
        print(f"rayalign: error: {err}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    verbose_help = "show everything: library progress bars, Ray's and transformers' notices, warnings"
    parser = argparse.ArgumentParser(prog="rayalign", description="Alignment pipelines on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    # -v after the command too (`rayalign run X -v`); SUPPRESS keeps a `-v` given before it.
    verbosity = argparse.ArgumentParser(add_help=False)
    verbosity.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text, parents=[verbosity])
        command.add_argument("config", help="pipeline YAML file")
        command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                             help="override a config value, e.g. stages.sft.train.lr=1e-4 (repeatable)")
        return command

    run = with_config("run", "run the pipeline (cached stages are skipped)")
    run.add_argument("--only", type=_stage_list, default=None, metavar="STAGE[,STAGE]",
                     help="run just these stages; upstream results come from the store or --input")
    run.add_argument("--force", type=_stage_list, default=[], metavar="STAGE[,STAGE]",
                     help="rerun these stages even if cached")
    run.add_argument("--input", dest="inputs", action="append", default=[], metavar="STAGE=PATH",
                     help="use an existing HF folder as this stage's output")
    run.add_argument("--no-wait", action="store_true",
                     help="stop (naming the holder) instead of waiting when another run is writing a stage")
    run.add_argument("--allow-stale-upstream", action="store_true",
                     help="with --only: use an upstream's newest stored artifact when none matches its config")
    run.add_argument("--ignore-gates", action="store_true",
                     help="run the stages downstream of a failed gate anyway (the failure is still logged and recorded)")
    run.set_defaults(handler=cmd_run)

    verify = with_config("verify", "check every stored artifact of this pipeline against its recorded sha256")
    verify.set_defaults(handler=cmd_verify)

    validate = with_config("validate", "check the config and read every data file, without training")
    validate.set_defaults(handler=cmd_validate)

    show = with_config("plan", "print the DAG and which stages are cached")
    show.set_defaults(handler=cmd_plan)

    report = with_config("report", "rebuild the run report (HTML + Markdown) from the store, without training")
    report.set_defaults(handler=cmd_report)
    add_cluster_commands(with_config)
    add_jobs_command(sub)
    return parser


def add_cluster_commands(with_config) -> None:
    """submit, k8s and sweep: the ways out of the laptop (pipeline/submit.py, k8s.py, sweep.py)."""
    submit = with_config("submit", "run the pipeline as a Ray job on an existing cluster (Job Submission API)")
    submit.add_argument("--address", default=None,
                        help="the cluster's dashboard, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, "
                             "then RAY_ADDRESS)")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return; don't stream logs")
    submit.add_argument("--resubmit", action="store_true",
                        help="run it again even if the same pipeline already succeeded on the cluster")
    submit.add_argument("--working-dir", default=None,
                        help="folder uploaded as the job's working_dir (default: the project holding CONFIG)")
    submit.add_argument("--code", choices=["ship", "installed"], default="ship",
                        help="ship: upload this checkout's pipeline/ and stages/ (default); "
                             "installed: the cluster's image has rayalign")
    submit.add_argument("--pip", action="append", default=[], metavar="REQ",
                        help="pip requirement installed for the job (repeatable; the image should carry the stack)")
    submit.add_argument("--env", action="append", default=[], metavar="KEY[=VALUE]",
                        help="environment variable for the job; KEY alone copies it from this shell (repeatable)")
    submit.add_argument("--python", default=None,
                        help="python executable on the cluster (default: the one the head's Ray runs on)")
    submit.add_argument("--command", choices=["run", "sweep"], default="run",
                        help="what the job runs: rayalign run (default) or rayalign sweep")
    submit.add_argument("--only", type=_stage_list, default=None, metavar="STAGE[,STAGE]",
                        help="the job runs just these stages; upstream results come from the cluster's store")
    submit.set_defaults(handler=cmd_submit)

    k8s = with_config("k8s", "render a KubeRay RayJob (+ ConfigMap) that runs the pipeline on Kubernetes")
    k8s.add_argument("-o", "--output", default=None, metavar="FILE", help="write here instead of stdout")
    k8s.add_argument("--image", default=None, help="container image with rayalign installed")
    k8s.add_argument("--namespace", default=None)
    k8s.add_argument("--storage-claim", default=None, metavar="PVC",
                     help="ReadWriteMany PVC mounted on every pod; storage goes there (an object-store "
                          "storage: its working mirror, storage_cache)")
    k8s.add_argument("--storage-secret", default=None, metavar="SECRET",
                     help="Secret whose keys (AWS_ACCESS_KEY_ID, ...) become every Ray pod's environment")
    k8s.add_argument("--service-account", default=None)
    k8s.add_argument("--gpus-per-pod", type=int, default=None, metavar="N",
                     help="GPUs per worker pod, e.g. a node's 8 (NCCL within a node uses NVLink); "
                          "default: one worker's")
    k8s.add_argument("--workers", type=int, default=None, metavar="N",
                     help="worker pods (replicas); default: as many as the largest stage needs (never fewer)")
    k8s.add_argument("--cluster-selector", default=None, metavar="RAYCLUSTER",
                     help="run on this existing RayCluster (clusterSelector) instead of creating one")
    k8s.add_argument("--command", choices=["run", "sweep"], default="run",
                     help="what the job runs: rayalign run (default) or rayalign sweep")
    k8s.set_defaults(handler=cmd_k8s)

    sweep = with_config("sweep", "run one stage's sweep (its sweep: section) and what it needs upstream")
    sweep.add_argument("--stage", default=None, help="the stage to sweep (default: the one with a sweep: section)")
    sweep.add_argument("--num-samples", type=int, default=None, help="grid: repeats of each point; random: draws")
    sweep.add_argument("--max-concurrent-trials", type=int, default=None)
    sweep.set_defaults(handler=cmd_sweep)


def add_jobs_command(sub) -> None:
    jobs = sub.add_parser("jobs", help="rayalign's Ray jobs on a cluster: list, status, logs, stop")
    actions = jobs.add_subparsers(dest="action", required=True)
    for name, help_text in (("list", "every rayalign job on the cluster"), ("status", "one job's status"),
                            ("logs", "one job's log"), ("stop", "stop a job and wait until it has stopped")):
        action = actions.add_parser(name, help=help_text)
        action.add_argument("--address", default=None,
                            help="the cluster's dashboard (default: RAY_API_SERVER_ADDRESS, then RAY_ADDRESS)")
        if name == "list":
            action.add_argument("--all", action="store_true", help="other Ray jobs too")
        else:
            action.add_argument("job_id", metavar="JOB", help="the submission id (rayalign jobs list shows them)")
        if name == "logs":
            action.add_argument("-f", "--follow", action="store_true", help="stream until the job ends")
            action.add_argument("--tail", type=int, default=None, metavar="N", help="only the last N lines")
    jobs.set_defaults(handler=cmd_jobs)


def _stage_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _inputs(pairs: list[str]) -> dict[str, str]:
    inputs = {}
    for pair in pairs:
        stage, sep, path = pair.partition("=")
        if not sep or not stage or not path:
            raise ValueError(f"--input {pair!r}: expected STAGE=PATH")
        inputs[stage] = path
    return inputs


GATED_EXIT = 3  # a gate stopped the run: distinct from 2 (bad input, failed stage) for CI scripts


def cmd_run(args) -> int:
    from pipeline.runner import GateFailed, run_pipeline
    from pipeline.spec import load_spec
    from pipeline.validate import validate_pipeline

    spec = load_spec(args.config, args.overrides)
    validate_pipeline(spec, stages=args.only, inputs=_inputs(args.inputs))  # every check before any training
    started = time.monotonic()
    try:
        artifacts = run_pipeline(spec, only=args.only, force=args.force, inputs=_inputs(args.inputs),
                                 wait=not args.no_wait, allow_stale_upstream=args.allow_stale_upstream,
                                 ignore_gates=args.ignore_gates)
    except GateFailed as gate:
        print(f"rayalign: gated: {gate}", file=sys.stderr)
        print(f"report: {_report(spec, _inputs(args.inputs))}")
        return GATED_EXIT
    print(f"\n{spec.name}: {len(artifacts)} node(s) ready in {time.monotonic() - started:.1f}s")
    for node, artifact in artifacts.items():
        print(f"  {node:<16} {artifact.fingerprint}  {artifact.model_dir}")
    print(f"report: {_report(spec, _inputs(args.inputs))}")
    return 0


def _report(spec, inputs: dict[str, str] | None = None) -> str:
    """Build the run report; a failure to draw it never fails the run."""
    from pipeline.report import build_report

    try:
        return str(build_report(spec, inputs))
    except Exception as err:  # noqa: BLE001
        return f"not written ({type(err).__name__}: {err}); retry with: rayalign report CONFIG"


def cmd_report(args) -> int:
    from pipeline.report import build_report
    from pipeline.spec import load_spec

    spec = load_spec(args.config, args.overrides)
    print(build_report(spec))
    return 0


def cmd_validate(args) -> int:
    from pipeline.validate import validate_pipeline

    from pipeline.spec import load_spec

    spec = load_spec(args.config, args.overrides)
    for line in validate_pipeline(spec):
        print(line)
    print(f"{args.config}: OK")
    return 0


def cmd_plan(args) -> int:
    from pipeline.report import store_label
    from pipeline.runner import plan
    from pipeline.sweep import concurrent_resources, describe_trials
    from pipeline.spec import load_spec
    from pipeline.dag import concurrent_peak
    from stages.resources import format_amounts

    spec = load_spec(args.config, args.overrides)
    the_plan = plan(spec)
    print(f"{spec.name}  (store: {store_label(spec)})")
    # A swept stage asks for its concurrent trials at once, so the peak is what the cluster must hold.
    resources = {node: concurrent_resources(config, node) for node, config in spec.stages.items()}
    for node in the_plan.dag.order:
        parents = the_plan.dag.parents[node]
        kind = spec.stages[node].kind if node in spec.stages else "base"
        status = "cached" if the_plan.cached[node] is not None else "to run"
        refs = ", ".join(f"{role}={parent}" for role, parent in parents.items()) or "-"
        print(f"  {node:<16} {kind:<8} {the_plan.fingerprints[node]}  {status:<7} <- {refs}")
        for reason in the_plan.why_stale.get(node, []):
            print(f"      stale: {reason}")
        for condition in getattr(spec.stages.get(node), "gate", []):
            print(f"      gate: {condition}")
        if getattr(spec.stages.get(node), "sweep", None) is not None:
            upstream = {role: the_plan.fingerprints[parent] for role, parent in parents.items()}
            print("\n".join(f"      {line}" for line in describe_trials(spec, node, upstream)))
        if node in resources:  # what the stage asks Ray for, under its line
            print("\n".join(f"      {line}" for line in resources[node].describe().splitlines()))
    at_once = spec.max_concurrent_stages
    most = format_amounts(concurrent_peak(the_plan.dag, resources, at_once))
    print(f"peak (the largest stage; stages run one at a time): {most}" if at_once == 1 else
          f"peak (up to {at_once} stages at once, none upstream of another): {most}")
    return 0


def cmd_verify(args) -> int:
    """Hash every complete artifact of the pipeline's stages; a damaged one is taken out of use."""
    from pipeline.spec import load_spec
    from pipeline.store import ArtifactStore, hash_problems

    spec = load_spec(args.config, args.overrides)
    store = ArtifactStore(spec.run_root())
    damaged = 0
    for stage in ["base", *spec.stages]:
        for artifact in store.complete(stage):
            problems = hash_problems(artifact)
            recorded = len(artifact.manifest.get("files", {}))
            if problems:
                damaged += 1
                store.mark_damaged(artifact, problems)
                print(f"  {stage:<16} {artifact.fingerprint}  DAMAGED: {'; '.join(problems)} (rerun on the next run)")
            else:
                print(f"  {stage:<16} {artifact.fingerprint}  ok ({recorded} files)" if recorded else
                      f"  {stage:<16} {artifact.fingerprint}  unverifiable (written without checksums)")
    print(f"{store.location}: {damaged} damaged artifact(s)")
    return 1 if damaged else 0


def cmd_submit(args) -> int:
    from pipeline.jobs import ClusterUnreachable, JobConflict
    from pipeline.submit import submit

    try:
        _, status = submit(args.config, args.address, args.overrides, wait=not args.no_wait, resubmit=args.resubmit,
                           working_dir=args.working_dir, code=args.code, pip=args.pip, env=args.env,
                           python=args.python, command=args.command, only=args.only)
    except (ClusterUnreachable, JobConflict) as err:
        print(f"rayalign: error: {err}", file=sys.stderr)
        return 2
    return 0 if status in (None, "SUCCEEDED") else 1


def cmd_jobs(args) -> int:
    from pipeline import jobs

    try:
        client = jobs.job_server(args.address)
    except jobs.ClusterUnreachable as err:
        print(f"rayalign: error: {err}", file=sys.stderr)
        return 2
    if args.action == "list":
        return jobs.list_jobs(client, include_all=args.all)
    if args.action == "status":
        return jobs.show_status(client, args.job_id)
    if args.action == "logs":
        return jobs.show_logs(client, args.job_id, follow=args.follow, tail=args.tail)
    return jobs.stop_job(client, args.job_id)


def cmd_k8s(args) -> int:
    from pipeline.k8s import main_k8s

    return main_k8s(args.config, args.overrides, args.output, args.command, image=args.image, namespace=args.namespace,
                    storage_claim=args.storage_claim, storage_secret=args.storage_secret,
                    service_account=args.service_account,
                    gpus_per_pod=args.gpus_per_pod, workers=args.workers, cluster_selector=args.cluster_selector)


def cmd_sweep(args) -> int:
    """Run one stage's sweep (and what it needs upstream), as ``rayalign run`` would within the DAG."""
    from pipeline.dag import build_dag
    from pipeline.runner import run_pipeline
    from pipeline.spec import load_spec
    from pipeline.sweep import resolve_sweep

    overrides = list(args.overrides)
    spec = load_spec(args.config, overrides)
    stage, _ = resolve_sweep(spec, args.stage)
    for key in ("num_samples", "max_concurrent_trials"):
        if getattr(args, key) is not None:
            overrides.append(f"stages.{stage}.sweep.{key}={getattr(args, key)}")
    spec = load_spec(args.config, overrides)
    dag = build_dag(spec)
    artifact = run_pipeline(spec, only=[n for n in dag.order if n in dag.upstream_closure({stage})])[stage]
    results = artifact.manifest["sweep"]
    print(f"\n{spec.name}/{stage}: {len(results['trials'])} trial(s), {results['stopped_early']} stopped early")
    for trial in results["trials"]:
        value = trial.get("value")
        shown = f"{value:.4g}" if isinstance(value, (int, float)) else "-"
        print(f"  {trial['status']:<8} {results['metric']}={shown:<10} {trial['overrides']}")
    print(f"best: {results['best']['overrides']} -> {artifact.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
