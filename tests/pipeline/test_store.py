"""The artifact store: only complete artifacts are ever found; writes land atomically."""

from __future__ import annotations

import json

from pipeline.store import ArtifactStore, fingerprint


def test_partial_folder_is_never_an_artifact(tmp_path):
    store = ArtifactStore(tmp_path)
    partial = store.partial_dir("sft", "abc")
    (partial / "manifest.json").write_text(json.dumps({"status": "running"}))
    (partial / "model").mkdir()
    assert store.find("sft", "abc") is None
    assert store.latest("sft") is None


def test_commit_moves_into_place_with_status_complete(tmp_path):
    store = ArtifactStore(tmp_path)
    partial = store.partial_dir("sft", "abc")
    (partial / "model").mkdir()
    (partial / "model" / "weights").write_text("w1")
    artifact = store.commit("sft", "abc", {"stage": "sft", "fingerprint": "abc"})
    assert not partial.exists()
    assert artifact.path == tmp_path / "sft" / "abc"
    assert json.loads((artifact.path / "manifest.json").read_text())["status"] == "complete"
    assert store.find("sft", "abc").model_dir.joinpath("weights").read_text() == "w1"


def test_forced_rerun_replaces_the_old_artifact(tmp_path):
    store = ArtifactStore(tmp_path)
    for content in ("old", "new"):
        partial = store.partial_dir("sft", "abc")
        (partial / "model").mkdir()
        (partial / "model" / "weights").write_text(content)
        store.commit("sft", "abc", {"stage": "sft"})
    assert (tmp_path / "sft" / "abc" / "model" / "weights").read_text() == "new"
    assert [p.name for p in (tmp_path / "sft").iterdir()] == ["abc"]


def test_latest_is_the_most_recently_finished(tmp_path):
    store = ArtifactStore(tmp_path)
    for fp, finished in (("one", "2026-01-02"), ("two", "2026-01-01")):
        folder = tmp_path / "sft" / fp
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps({"status": "complete", "finished": finished}))
    assert store.latest("sft").fingerprint == "one"


def test_fingerprint_is_order_independent_and_content_sensitive():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
