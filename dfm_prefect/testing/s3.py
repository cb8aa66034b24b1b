"""A real S3 endpoint on 127.0.0.1 (moto's server) for demos and tests."""

from __future__ import annotations

import os
from types import TracebackType

from dfm_prefect.transports.base import free_port

DEMO_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "dfm-demo-key",
    "AWS_SECRET_ACCESS_KEY": "dfm-demo-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class LocalS3:
    """moto's S3 server in a background thread of this process, on a free loopback port."""

    def __init__(self, port: int | None = None) -> None:
        from moto.server import ThreadedMotoServer

        self.port = port or free_port()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._fs = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def storage_options(self) -> dict[str, object]:
        return {
            "key": DEMO_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "secret": DEMO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {"endpoint_url": self.endpoint_url},
        }

    def filesystem(self):
        """An s3fs filesystem for this endpoint (one per server, closed with it)."""
        import s3fs

        if self._fs is None:
            self._fs = s3fs.S3FileSystem(**self.storage_options, skip_instance_cache=True)
        return self._fs

    def start(self) -> LocalS3:
        import logging

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise
        for key, value in DEMO_CREDENTIALS.items():
            os.environ.setdefault(key, value)
        self._server.start()
        return self

    def stop(self) -> None:
        if self._fs is not None and getattr(self._fs, "_s3creator", None) is not None:
            # Close the aiohttp session now rather than at interpreter exit.
            type(self._fs).close_session(self._fs.loop, self._fs._s3creator)
        self._fs = None
        self._server.stop()

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
