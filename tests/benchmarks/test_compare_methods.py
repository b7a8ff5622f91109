"""benchmarks/compare_methods.py builds a valid pipeline spec for every adaptation method (no Ray, nothing timed):
a renamed option, or a new peft.method missing from the comparison, fails here rather than in the benchmark."""

from __future__ import annotations

import importlib.util
import typing

import pytest

from stages.config import PeftConfig
from stages.sft import SFTConfig
from tests.conftest import REPO


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_methods", REPO / "benchmarks" / "compare_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_peft_method_is_compared(compare):
    methods = set(typing.get_args(PeftConfig.model_fields["method"].annotation))
    assert set(compare.METHODS) == methods
    assert set(compare.COURSE) == methods


def test_every_method_builds_a_valid_sft_spec(compare, tmp_path):
    for method in compare.METHODS:
        base = tmp_path / compare.base_name(method, "tiny-llama-4m")
        spec = compare.method_spec(method, tmp_path / "store", base, steps=7, batch=3)
        stage = spec.stages["sft"]
        assert isinstance(stage, SFTConfig) and stage.from_ == "base"
        assert stage.peft.method == method
        assert (stage.train.max_steps, stage.train.batch_size, stage.data.limit) == (7, 3, 21)
        assert stage.train.lr == compare.METHODS[method]["lr"]
        assert spec.base.model == str(base)
        # BitFit trains biases, so only it runs on the biased twin of the base.
        assert base.name.endswith("-bias") == (method == "bitfit")


def test_the_table_names_a_skipped_method(compare):
    table = compare.markdown_table([{"method": "qlora", "skipped": "no bitsandbytes"}])
    assert "| qlora | skipped: no bitsandbytes |" in table


def test_the_report_holds_the_budget_every_method_and_the_plot(compare, tmp_path):
    """The committed demo-budget run, rewritten as a report: one table row per method and the plot's link."""
    import json

    source = REPO / "benchmarks" / "results" / "compare_methods_demo_budget.json"
    result = json.loads(source.read_text())
    report = compare.write_report(result, tmp_path / source.name).read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == list(compare.METHODS)
    assert "700 SFT steps x 64" in report and "| full | 540.3k | 100% |" in report
    assert "](compare_methods_demo_budget.png)" in report
