"""The ``rayalign`` command.

    rayalign run CONFIG [--only STAGE[,STAGE]] [--force STAGE] [--input STAGE=PATH] [--set KEY=VALUE]
    rayalign validate CONFIG     check the config and read every data file completely
    rayalign plan CONFIG         print the DAG and which stages are cached
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from pipeline.dag import DAGError
    from pipeline.runner import RunError
    from pipeline.spec import SpecError

    try:
        return args.handler(args)
    except (SpecError, DAGError, RunError, ValueError, FileNotFoundError) as err:
        print(f"rayalign: error: {err}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayalign", description="Alignment pipelines on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text)
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
    run.set_defaults(handler=cmd_run)

    validate = with_config("validate", "check the config and read every data file, without training")
    validate.set_defaults(handler=cmd_validate)

    show = with_config("plan", "print the DAG and which stages are cached")
    show.set_defaults(handler=cmd_plan)
    return parser


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


def cmd_run(args) -> int:
    from pipeline.runner import run_pipeline
    from pipeline.spec import load_spec

    spec = load_spec(args.config, args.overrides)
    started = time.monotonic()
    artifacts = run_pipeline(spec, only=args.only, force=args.force, inputs=_inputs(args.inputs))
    print(f"\n{spec.name}: {len(artifacts)} node(s) ready in {time.monotonic() - started:.1f}s")
    for node, artifact in artifacts.items():
        print(f"  {node:<16} {artifact.fingerprint}  {artifact.model_dir}")
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
    from pipeline.runner import plan
    from pipeline.spec import load_spec

    spec = load_spec(args.config, args.overrides)
    the_plan = plan(spec)
    print(f"{spec.name}  (store: {spec.run_root()})")
    for node in the_plan.dag.order:
        parents = the_plan.dag.parents[node]
        kind = spec.stages[node].kind if node in spec.stages else "base"
        status = "cached" if the_plan.cached[node] is not None else "to run"
        refs = ", ".join(f"{role}={parent}" for role, parent in parents.items()) or "-"
        print(f"  {node:<16} {kind:<8} {the_plan.fingerprints[node]}  {status:<7} <- {refs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
