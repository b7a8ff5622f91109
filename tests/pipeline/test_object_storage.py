"""Object-store storage (``storage: s3://...``) against a real S3-compatible server on 127.0.0.1
(moto, ``tests/s3_server.py``): the filesystem layer, the store's commit point (manifest last), damage
detection, refused credentials, and one small real SFT run whose artifact, checkpoints and report
land in the bucket and whose rerun, from an empty mirror (another host), is a cache hit."""

from __future__ import annotations

import json

import pytest

from pipeline.content_hash import CACHE_ENV
from pipeline.runner import plan, run_pipeline
from pipeline.spec import SpecError, parse_spec
from pipeline.store import MANIFEST, ArtifactStore, StoreError, hash_problems
from stages.remote_storage import RemoteFolder, StorageError
from tests.helpers import make_spec, quick_sft
from tests.s3_server import running_s3_server

BUCKET = "rayalign-test"


@pytest.fixture(scope="module")
def s3_server():
    with running_s3_server() as server:
        yield server


@pytest.fixture(scope="module")
def bucket(s3_server):
    s3_server.client().create_bucket(Bucket=BUCKET)
    return BUCKET


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "sha256.json"))


# --------------------------------------------------------------------------- bad input (no Ray, no training)


@pytest.mark.parametrize("storage, named", [
    ("s3://AKIAEXAMPLE:hunter2-secret@bkt/runs", "user:secret@"),
    ("s3://bkt/runs?secret_key=hunter2-secret&endpoint_override=127.0.0.1:1", "secret_key"),
])
def test_a_uri_with_credentials_is_refused_without_repeating_them(storage, named):
    with pytest.raises(SpecError) as err:
        parse_spec({"name": "t", "storage": storage})
    message = str(err.value)
    assert "storage:" in message and "credentials" in message and named in message
    assert "hunter2" not in message  # the secret is never echoed


def test_unknown_scheme_and_missing_bucket_are_clear_errors(s3_server, tmp_path):
    with pytest.raises(SpecError, match=r"storage: unknown scheme 'ftp'"):
        parse_spec({"name": "t", "storage": "ftp://host/runs"})
    spec = parse_spec({"name": "t", "storage": s3_server.uri("no-such-bucket", "runs"),
                       "storage_cache": str(tmp_path), "stages": {"sft": quick_sft()}})
    with pytest.raises(StorageError, match=r"storage: s3://no-such-bucket/runs/t: the bucket 'no-such-bucket' "
                                           r"does not exist"):
        plan(spec)  # before anything trains: opening the store checks it


# --------------------------------------------------------------------------- the layer and the store, unit level


def test_remote_folder_uploads_lists_downloads_and_deletes(s3_server, bucket, tmp_path):
    folder = RemoteFolder(s3_server.uri(bucket, "unit/layer"))
    (tmp_path / "up" / "sub").mkdir(parents=True)
    (tmp_path / "up" / "a.txt").write_text("alpha")
    (tmp_path / "up" / "sub" / "b.bin").write_bytes(bytes(range(256)) * 40)
    folder.upload_tree(tmp_path / "up")
    assert folder.file_sizes() == {"a.txt": 5, "sub/b.bin": 10240}
    assert s3_server.keys(bucket, "unit/layer/") == {"unit/layer/a.txt": 5, "unit/layer/sub/b.bin": 10240}
    assert folder.subfolders() == ["sub"]
    folder.download("sub/b.bin", tmp_path / "down" / "b.bin")
    assert (tmp_path / "down" / "b.bin").read_bytes() == bytes(range(256)) * 40
    assert folder.read_bytes("nothing-here") is None
    folder.delete()
    assert s3_server.keys(bucket, "unit/layer/") == {}


def commit_files(store: ArtifactStore, stage: str, fp: str, files: dict[str, bytes]):
    partial = store.start_attempt(stage, fp)
    for rel, data in files.items():
        (partial / rel).parent.mkdir(parents=True, exist_ok=True)
        (partial / rel).write_bytes(data)
    return store.commit(stage, fp, {"stage": stage, "fingerprint": fp}, partial)


def test_commit_uploads_the_manifest_last_and_damage_is_detected(s3_server, bucket, tmp_path):
    uri = s3_server.uri(bucket, "unit/store")
    store = ArtifactStore(tmp_path / "mirror-a", remote=uri)
    files = {"data/one.json": b'{"x": 1}', "data/two.bin": b"\x00" * 3000, "notes.txt": b"hello"}
    artifact = commit_files(store, "ev", "f1", files)

    # Every file went up before the manifest: the complete manifest is the commit point.
    writes = s3_server.writes(f"/{bucket}/unit/store/ev/f1/")
    assert writes[-1] == f"/{bucket}/unit/store/ev/f1/{MANIFEST}"
    assert {w.rsplit("/ev/f1/", 1)[1] for w in writes[:-1]} == set(files)
    stored = json.loads(s3_server.client().get_object(Bucket=bucket, Key=f"unit/store/ev/f1/{MANIFEST}")["Body"].read())
    assert stored["status"] == "complete" and set(stored["files"]) == set(files)

    # Another host (an empty mirror) finds it on the object store and fetches it, checked.
    other = ArtifactStore(tmp_path / "mirror-b", remote=uri)
    found = other.find("ev", "f1")
    assert found is not None and found.manifest["finished"] == artifact.manifest["finished"]
    assert [a.fingerprint for a in other.complete("ev")] == ["f1"] and other.latest("ev").fingerprint == "f1"
    other.fetch(found)
    assert {rel: (found.path / rel).read_bytes() for rel in files} == files

    # An object altered in place (same size): its hash no longer matches; fetching it marks it damaged.
    s3_server.client().put_object(Bucket=bucket, Key="unit/store/ev/f1/notes.txt", Body=b"HELLO")
    assert hash_problems(other.find("ev", "f1")) == ["notes.txt does not match its recorded sha256"]
    third = ArtifactStore(tmp_path / "mirror-c", remote=uri)
    with pytest.raises(StoreError, match=r"notes.txt does not match its sha256"):
        third.fetch(third.find("ev", "f1"))
    assert third.find("ev", "f1") is None  # marked damaged on the object store: every host reruns it

    # A missing object: the (cheap, size-only) cache check already rejects the artifact.
    commit_files(store, "ev", "f2", files)
    s3_server.client().delete_object(Bucket=bucket, Key="unit/store/ev/f2/data/two.bin")
    assert other.find("ev", "f2") is None


# --------------------------------------------------------------------------- one real stage run on the object store


@pytest.fixture(scope="module")
def s3_run(ray_cluster, tiny_base, s3_server, bucket, tmp_path_factory):
    """One 4-step LoRA SFT with a checkpoint at step 2, on ``s3://<bucket>/runs``; the report built after."""
    from pipeline.report import build_report

    stages = {"sft": quick_sft(train={"save_steps": 2})}

    def spec(cache, extra_stages=None):
        return make_spec(s3_server.uri(bucket, "runs"), tiny_base, {**stages, **(extra_stages or {})}, name="s3run",
                         storage_cache=str(cache))

    first_spec = spec(tmp_path_factory.mktemp("mirror-host-a"))
    artifacts = run_pipeline(first_spec)
    build_report(first_spec)
    return {"spec": spec, "first": artifacts}


@pytest.mark.slow
def test_a_stage_commits_its_artifact_checkpoints_and_report_to_the_bucket(s3_run, s3_server, bucket):
    sft = s3_run["first"]["sft"]
    prefix = f"runs/s3run/sft/{sft.fingerprint}/"
    keys = s3_server.keys(bucket, prefix)
    assert {f"{prefix}{rel}": record["size"] for rel, record in sft.manifest["files"].items()}.items() <= keys.items()
    assert f"{prefix}model/adapter_model.safetensors" in keys and f"{prefix}{MANIFEST}" in keys
    stored = json.loads(s3_server.client().get_object(Bucket=bucket, Key=f"{prefix}{MANIFEST}")["Body"].read())
    assert stored["status"] == "complete" and stored["files"] == sft.manifest["files"]
    # Nothing in the manifest names the endpoint's options or any credential.
    assert "endpoint_override" not in json.dumps(stored) and "testing" not in json.dumps(stored)

    # Ray Train kept its checkpoint on the object store while training, and it was cleared once complete.
    ray_run = f"/{bucket}/runs/s3run/sft/.ray-{sft.fingerprint}/"
    assert any("/checkpoint-2/" in path for path in s3_server.writes(ray_run))
    assert s3_server.keys(bucket, ray_run.lstrip("/").split("/", 1)[1]) == {}

    report = s3_server.keys(bucket, "runs/s3run/report/")
    assert {"runs/s3run/report/index.html", "runs/s3run/report/report.md"} <= report.keys()
    index = s3_server.client().get_object(Bucket=bucket, Key="runs/s3run/report/index.html")["Body"].read().decode()
    assert f"s3://{bucket}/runs/s3run" in index and "endpoint_override" not in index


@pytest.mark.slow
def test_another_host_reuses_the_artifact_and_trains_on_it(s3_run, tmp_path):
    """From an empty mirror (another host): the stage is a cache hit, and a stage downstream of it
    fetches it from the bucket (checked against the manifest) and trains on it."""
    first = s3_run["first"]["sft"]
    mirror = tmp_path / "mirror-host-b"
    spec = s3_run["spec"](mirror, {"sft_next": quick_sft(**{"from": "sft"})})
    assert plan(spec).cached["sft"].fingerprint == first.fingerprint
    artifacts = run_pipeline(spec)
    again = artifacts["sft"]
    assert again.manifest["started"] == first.manifest["started"]  # not trained again
    assert again.remote == first.remote and hash_problems(again) == []
    fetched = mirror / "s3run" / "sft" / first.fingerprint
    assert {rel: (fetched / rel).stat().st_size for rel in first.manifest["files"]} == \
        {rel: record["size"] for rel, record in first.manifest["files"].items()}
    downstream = artifacts["sft_next"]
    assert downstream.manifest["inputs"] == {"sft": first.fingerprint}
    assert downstream.remote is not None and ArtifactStore(mirror / "s3run").find("sft_next", downstream.fingerprint)
