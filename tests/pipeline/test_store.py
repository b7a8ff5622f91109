"""The artifact store: only complete, undamaged artifacts are found; writes land atomically; one writer
per stage; fingerprints follow content."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from pipeline.content_hash import CACHE_ENV
from pipeline.locks import StageLock, StageLocked
from pipeline.store import ArtifactStore, StoreError, fingerprint, fingerprint_model_location, hash_problems


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "sha256.json"))


def write_model(folder, value: float = 1.0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"w": torch.full((4,), value)}, str(folder / "model.safetensors"))


def commit_model(store, stage="sft", fp="abc", value=1.0):
    partial = store.start_attempt(stage, fp)
    write_model(partial / "model", value)
    return store.commit(stage, fp, {"stage": stage, "fingerprint": fp, "model_type": "full"}, partial)


def test_an_attempt_folder_is_never_an_artifact(tmp_path):
    store = ArtifactStore(tmp_path)
    partial = store.start_attempt("sft", "abc")
    (partial / "manifest.json").write_text(json.dumps({"status": "running"}))
    write_model(partial / "model")
    assert store.find("sft", "abc") is None
    assert store.latest("sft") is None


def test_commit_moves_into_place_with_status_complete_and_checksums(tmp_path):
    store = ArtifactStore(tmp_path)
    artifact = commit_model(store)
    assert artifact.path == tmp_path / "sft" / "abc"
    assert not list((tmp_path / "sft").glob(".partial-*"))
    manifest = json.loads((artifact.path / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert set(manifest["files"]) == {"model/config.json", "model/model.safetensors"}
    assert manifest["files"]["model/config.json"]["size"] == len(json.dumps({"model_type": "llama"}))
    assert store.find("sft", "abc").model_dir == artifact.path / "model"


def test_forced_rerun_replaces_the_old_artifact(tmp_path):
    store = ArtifactStore(tmp_path)
    for value in (1.0, 2.0):
        commit_model(store, value=value)
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "sft" / "abc" / "model" / "model.safetensors"))["w"][0] == 2.0
    assert [p.name for p in (tmp_path / "sft").iterdir()] == ["abc"]


def test_commit_refuses_a_missing_folder_or_a_model_without_loadable_weights(tmp_path):
    store = ArtifactStore(tmp_path)
    partial = store.start_attempt("sft", "abc")
    os.rmdir(partial)
    with pytest.raises(StoreError, match="is gone"):
        store.commit("sft", "abc", {"model_type": "full"}, partial)

    partial = store.start_attempt("sft", "abc")
    (partial / "model").mkdir()
    (partial / "model" / "config.json").write_text("{}")
    with pytest.raises(StoreError, match=r"no \*\.safetensors weights"):
        store.commit("sft", "abc", {"model_type": "full"}, partial)
    (partial / "model" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    with pytest.raises(StoreError, match="not a readable safetensors file"):
        store.commit("sft", "abc", {"model_type": "full"}, partial)
    with pytest.raises(StoreError, match="adapter_config.json is missing"):
        (partial / "model" / "adapter_model.safetensors").write_bytes(b"")
        store.commit("sft", "abc", {"model_type": "adapter"}, partial)
    assert store.find("sft", "abc") is None and partial.is_dir()  # nothing marked complete, nothing lost
    # A stage that makes no model (an eval stage) commits without one.
    assert store.commit("eval", "e1", {"model_type": None}, store.start_attempt("eval", "e1")).manifest["files"] == {}


def test_a_new_attempt_adopts_the_crashed_one_with_its_checkpoints(tmp_path):
    store = ArtifactStore(tmp_path)
    crashed = store.start_attempt("sft", "abc")
    (crashed / "checkpoints" / "checkpoint-20").mkdir(parents=True)
    (crashed / "ray").mkdir()
    time.sleep(1.1)  # attempt ids have one-second resolution
    attempt = store.start_attempt("sft", "abc")
    assert attempt != crashed and not crashed.exists()
    assert (attempt / "checkpoints" / "checkpoint-20").is_dir()
    assert not (attempt / "ray").exists(), "Ray Train's run state names the old folder"
    assert store.attempts("sft", "abc") == [attempt]
    assert store.attempts("sft", "ab") == [], "another fingerprint's prefix is not an attempt"


def test_commit_removes_an_attempt_folder_that_a_dead_drivers_worker_recreated(tmp_path):
    # The killed driver's Ray Train worker outlives it by seconds and writes its next checkpoint to the
    # attempt's old path after the new run has adopted (renamed) it: that folder must not stay behind.
    store = ArtifactStore(tmp_path)
    crashed = store.start_attempt("sft", "abc")
    time.sleep(1.1)
    attempt = store.start_attempt("sft", "abc")
    (crashed / "checkpoints" / "checkpoint-30").mkdir(parents=True)
    (attempt / "model").mkdir()
    (attempt / "model" / "config.json").write_text("{}")
    (attempt / "model" / "model.safetensors").write_bytes(b"x")
    store.commit("sft", "abc", {"model_type": None}, attempt)
    assert sorted(p.name for p in store.stage_dir("sft").iterdir()) == ["abc"]


def test_a_truncated_artifact_is_not_used_and_verify_finds_an_altered_one(tmp_path):
    store = ArtifactStore(tmp_path)
    artifact = commit_model(store)
    weights = artifact.path / "model" / "model.safetensors"
    blob = weights.read_bytes()

    weights.write_bytes(blob[:-4])  # truncated: the size check of a cache hit sees it
    assert store.find("sft", "abc") is None
    assert "model/model.safetensors has" in hash_problems(artifact)[0]

    weights.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))  # same size, one bit flipped: only the hash sees it
    assert store.find("sft", "abc") is not None
    assert hash_problems(artifact) == ["model/model.safetensors does not match its recorded sha256"]
    store.mark_damaged(artifact, hash_problems(artifact))
    assert store.find("sft", "abc") is None and store.latest("sft") is None

    commit_model(store)  # the rerun replaces it
    assert hash_problems(store.find("sft", "abc")) == []


def test_model_folders_given_by_path_are_fingerprinted_by_content(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    write_model(folder, 1.0)
    before = fingerprint_model_location(str(folder))
    write_model(folder, 2.0)  # retrained: same shapes, same sizes, other weights
    assert fingerprint_model_location(str(folder)) != before
    write_model(folder, 1.0)
    assert fingerprint_model_location(str(folder)) == before

    # The hash is remembered by path, size and mtime: a second look reads no weights.
    import pipeline.content_hash as content_hash

    monkeypatch.setattr(content_hash, "sha256_file", lambda path: pytest.fail(f"{path} was hashed again"))
    assert fingerprint_model_location(str(folder)) == before
    # A hub id is fingerprinted with its revision.
    assert fingerprint_model_location("org/model", "v1") != fingerprint_model_location("org/model", "v2")


HOLD_LOCK = """
import sys, time
from pipeline.locks import StageLock
lock = StageLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
lock.release()
"""


def hold_lock(path, seconds: float) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path), str(seconds)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_held_lock_names_its_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    path = tmp_path / "sft" / ".lock-abc"
    holder = hold_lock(path, 60)
    with pytest.raises(StageLocked, match=rf"pid {holder.pid} on .*, since 20"):
        StageLock(path, wait=False).acquire()

    holder.send_signal(signal.SIGKILL)  # dies holding it: the kernel drops the lock, the record stays
    holder.wait()
    with StageLock(path, wait=False) as lock:
        assert lock.took_over is not None and lock.took_over.pid == holder.pid
    assert not path.exists(), "a released lock leaves nothing behind"


def test_a_waiting_run_gets_the_lock_when_the_holder_releases_it(tmp_path):
    path = tmp_path / "sft" / ".lock-abc"
    holder = hold_lock(path, 2)
    said = []
    started = time.monotonic()
    with StageLock(path, poll_seconds=0.2, on_wait=said.append) as lock:
        waited = time.monotonic() - started
        assert lock.took_over is None, "a clean release is not a takeover"
    holder.wait()
    assert len(said) == 1 and f"pid {holder.pid}" in said[0]
    assert waited > 0.5, f"got the lock after {waited:.2f}s while it was held for 2s"


def test_fingerprint_is_order_independent_and_content_sensitive():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_run_no_wait_names_the_holder_and_writes_nothing(tiny_base, tmp_path):
    import yaml

    from pipeline.runner import plan
    from pipeline.spec import load_spec
    from tests.helpers import quick_sft

    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"name": "t", "storage": str(tmp_path), "base": {"model": str(tiny_base)},
                                      "stages": {"sft": quick_sft()}}))
    fp = plan(load_spec(str(config))).fingerprints["sft"]
    holder = hold_lock(tmp_path / "t" / "sft" / f".lock-{fp}", 120)
    try:
        refused = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(config), "--no-wait"],
                                 capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert f"sft: another run is writing this stage (pid {holder.pid} on" in refused.stderr
    assert "rerun without --no-wait" in refused.stderr and "Traceback" not in refused.stderr
    assert [p.name for p in (tmp_path / "t" / "sft").iterdir()] == [f".lock-{fp}"]


@pytest.fixture
def small_mount(tmp_path):
    """A 512 KiB tmpfs: room for a lock, a manifest and a tokenizer, not for a model's weights."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs CAP_SYS_ADMIN): {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def run_base_only(storage) -> subprocess.CompletedProcess:
    import yaml

    from tests.helpers import quick_sft

    config = storage.parent / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"name": "t", "storage": str(storage),
                                      "base": {"model": "builtin:tiny-llama", "pretrain_steps": 0},
                                      "stages": {"sft": quick_sft()}}))
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(config), "--only", "base"],
                          capture_output=True, text=True, timeout=300)


def test_a_full_store_fails_clearly_and_marks_nothing_complete(small_mount):
    full = run_base_only(small_mount)
    assert full.returncode == 2, full.stderr[-2000:]
    assert "stage 'base'" in full.stderr and "No space left on device" in full.stderr
    assert "Traceback" not in full.stderr
    assert ArtifactStore(small_mount / "t").latest("base") is None
    for manifest in small_mount.glob("t/base/*/manifest.json"):
        assert json.loads(manifest.read_text())["status"] != "complete", "nothing may look finished"


def test_a_read_only_store_fails_clearly(small_mount):
    subprocess.run(["mount", "-o", "remount,ro", str(small_mount)], check=True)
    refused = run_base_only(small_mount)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "Read-only file system" in refused.stderr and str(small_mount) in refused.stderr
    assert "Traceback" not in refused.stderr


def test_verify_command_reports_and_retires_an_altered_artifact(tmp_path, capsys):
    import yaml

    from pipeline.cli import main
    from tests.helpers import quick_sft

    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"name": "t", "storage": str(tmp_path), "base": {"model": "builtin:tiny-llama"},
                                      "stages": {"sft": quick_sft()}}))
    store = ArtifactStore(tmp_path / "t")
    commit_model(store, fp="good")
    altered = commit_model(store, fp="bad")
    weights = altered.path / "model" / "model.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))

    assert main(["verify", str(config)]) == 1
    out = capsys.readouterr().out
    assert "sft              good  ok (2 files)" in out
    assert "sft              bad  DAMAGED: model/model.safetensors does not match its recorded sha256" in out
    assert store.find("sft", "bad") is None and store.find("sft", "good") is not None
    assert main(["verify", str(config)]) == 0  # the damaged one is out of use now
