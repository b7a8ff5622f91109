"""A real S3-compatible server for the object-storage tests: moto's server (Flask/werkzeug) in a thread
of the test process on 127.0.0.1, on a free port. Every request it serves is recorded, so a test can
see what was written and in which order.

Importing this module sets dummy AWS credentials in the environment (moto accepts any), before the
session's Ray instance starts: pyarrow, in the driver and in the Ray Train workers, reads them there,
as it would read real ones.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field


for _key, _value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
    os.environ.setdefault(_key, _value)

_REQUEST = re.compile(r'"([A-Z]+) (\S+) HTTP/[\d.]+" (\d+)')


@dataclass
class S3Server:
    endpoint: str  # host:port
    requests: list[tuple[str, str, int]] = field(default_factory=list)  # (method, path, status) as served

    def uri(self, bucket: str, prefix: str) -> str:
        return f"s3://{bucket}/{prefix}?endpoint_override={self.endpoint}&scheme=http"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=f"http://{self.endpoint}", region_name="us-east-1")

    def keys(self, bucket: str, prefix: str) -> dict[str, int]:
        """Every object under ``prefix`` -> its size, read with an independent client (boto3)."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}

    def writes(self, path_prefix: str) -> list[str]:
        """Paths of the objects written under ``/<bucket>/<prefix>``, in the order they became visible: a
        plain PUT, or the POST that completes a multipart upload (pyarrow's way)."""
        done = []
        for method, path, status in self.requests:
            key, _, query = path.partition("?")
            if status >= 300 or not key.startswith(path_prefix):
                continue
            if (method == "PUT" and "partNumber=" not in query) or (method == "POST" and "uploadId=" in query):
                done.append(key)
        return done


class _Recorder(logging.Handler):
    def __init__(self, server: S3Server):
        super().__init__()
        self.server = server

    def emit(self, record: logging.LogRecord) -> None:
        if match := _REQUEST.search(record.getMessage()):
            self.server.requests.append((match.group(1), match.group(2), int(match.group(3))))


@contextmanager
def running_s3_server():
    """moto's S3 server on 127.0.0.1 (it starts in milliseconds), recording every request it serves."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    handle = S3Server(endpoint=f"{host}:{port}")
    werkzeug = logging.getLogger("werkzeug")  # werkzeug logs one line per request served
    recorder, level, propagate = _Recorder(handle), werkzeug.level, werkzeug.propagate
    werkzeug.addHandler(recorder)
    werkzeug.setLevel(logging.INFO)
    werkzeug.propagate = False  # recorded, not printed
    try:
        yield handle
    finally:
        werkzeug.removeHandler(recorder)
        werkzeug.setLevel(level)
        werkzeug.propagate = propagate
        server.stop()
