"""moto's S3-compatible server on 127.0.0.1, in a thread of the test process, for every test (and
bench) that needs a real S3 HTTP API: publishing, and the scale-out store."""

from __future__ import annotations

import uuid

import boto3
from moto.server import ThreadedMotoServer

KEY_ID = "AKIDTESTPUBLISH"
SECRET = "s3-secret-never-shown-0123456789"  # tests check that it never shows in output


class MotoS3:
    """The server and a boto3 client to look at what the service wrote; ``close()`` stops both."""

    def __init__(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET,
        )

    def bucket(self, create: bool = True) -> str:
        """A fresh bucket name, created unless ``create`` is false."""
        name = f"dsocr-{uuid.uuid4().hex[:12]}"
        if create:
            self.client.create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> dict[str, str]:
        """Every object of ``bucket`` under ``prefix``: its key and ETag."""
        found: dict[str, str] = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                found[obj["Key"]] = obj["ETag"]
        return found

    def stop(self) -> None:
        self._server.stop()  # werkzeug closes the listening socket: connections are refused from now on

    def close(self) -> None:
        self.client.close()
        self.stop()
