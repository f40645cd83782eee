"""A real S3-protocol server on loopback for the tests (a pytest plugin named in
conftest.py): moto's standalone server (`moto_server`, from the dev extra), one per test
session, in a process of its own; every test gets a bucket of its own.

Without moto, or when its server does not start, the S3 tests are skipped with the
reason, unless POE_TEST_REQUIRE_S3=1 (as in CI), where that fails them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid

import pytest
from service_fixtures import free_port, listening

# moto accepts any credentials; these are what the tests and their `poe` processes use.
S3_ENV = {"AWS_ACCESS_KEY_ID": "poe-test", "AWS_SECRET_ACCESS_KEY": "poe-test-secret",
          "AWS_REGION": "us-east-1"}


def _unavailable(problem: str):
    if os.environ.get("POE_TEST_REQUIRE_S3") == "1":
        pytest.fail(problem)
    pytest.skip(problem)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """http://127.0.0.1:PORT of a moto S3 server running for the session."""
    server = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    if server is None:
        _unavailable("no S3 server to test against: moto_server is not installed (pip install 'moto[server]', "
                     "part of the dev extra)")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    if not listening(port, proc, timeout=60):
        proc.kill()
        _unavailable(f"moto_server did not start on 127.0.0.1:{port}: {log.read_text()[-500:]}")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def new_bucket(endpoint: str) -> str:
    name = f"poe-{uuid.uuid4().hex[:12]}"
    s3_client(endpoint).create_bucket(Bucket=name)
    return name


def s3_client(endpoint: str):
    """boto3 (moto's dependency): the tests' way to make buckets and tamper with objects."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"], region_name=S3_ENV["AWS_REGION"])


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """A new bucket on the session's server, and this process's AWS_* variables pointing
    at it; yields (POE_BLOB_URL with a prefix, bucket name, the AWS_* variables)."""
    env = S3_ENV | {"AWS_ENDPOINT_URL": s3_endpoint}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    bucket = new_bucket(s3_endpoint)
    yield f"s3://{bucket}/blobs", bucket, env
