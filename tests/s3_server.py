"""A throwaway S3-compatible server for tests: moto's server mode in its own process on 127.0.0.1,
with IAM enforced, a bucket, a read-write and a read-only access key."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Iterator

BUCKET = "pofa-test"
# moto lets this many requests through before it enforces IAM: the setup below (bucket, two users,
# their policies and keys) and nothing after it
_SETUP_REQUESTS = 7


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:<port>
    read_write: dict[str, str]  # AWS_* environment variables of a key that may do anything
    read_only: dict[str, str]  # ...of a key that may only list and read

    def env(self, key: dict[str, str]) -> dict[str, str]:
        """Environment for a process using `key`: pyarrow and boto3 read AWS_ENDPOINT_URL."""
        return {**key, "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def uri(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _key(iam, user: str, actions: list[str] | str) -> dict[str, str]:
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName=user, PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


@contextlib.contextmanager
def s3_server(log_path: str) -> Iterator[S3Server]:
    import boto3

    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_SETUP_REQUESTS)}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto server did not start; see {log_path}") from None
                time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        admin = {"aws_access_key_id": "setup", "aws_secret_access_key": "setup", "region_name": "us-east-1",
                 "endpoint_url": endpoint}
        boto3.client("s3", **admin).create_bucket(Bucket=BUCKET)
        iam = boto3.client("iam", **admin)
        read_write = _key(iam, "pofa-rw", "s3:*")
        read_only = _key(iam, "pofa-ro", ["s3:GetObject", "s3:ListBucket"])
        yield S3Server(endpoint, read_write, read_only)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
