"""A real MLflow tracking server for the tests: `mlflow server` on a free loopback port with a SQLite backend and a
temporary artifact folder, in its own process group, stopped by signalling that group."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from phi2_assets.launch.train_entry import free_port

STARTUP_TIMEOUT_S = 180
SHUTDOWN_TIMEOUT_S = 30


@dataclass
class MlflowServer:
    root: Path
    port: int
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join((self.root / "server.log").read_text(errors="replace").splitlines()[-lines:])

    def wait_until_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/health", timeout=10).ok:
                    return
            except requests.RequestException:  # not listening yet, or still starting the app
                pass
            time.sleep(1)
        raise RuntimeError(f"mlflow server not healthy after {STARTUP_TIMEOUT_S}s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM the server's process group (its workers are in it); SIGKILL what is left after the timeout."""
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=SHUTDOWN_TIMEOUT_S)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
        while time.monotonic() < deadline and _group_alive(self.process.pid):
            time.sleep(0.5)
        if _group_alive(self.process.pid):
            os.killpg(self.process.pid, signal.SIGKILL)
            raise RuntimeError(f"mlflow server group {self.process.pid} outlived SIGTERM; killed")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def start_server(root: Path) -> MlflowServer:
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
        "--workers", "1",
    ]
    with open(root / "server.log", "wb") as log:
        process = subprocess.Popen(command, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = MlflowServer(root=root, port=port, process=process)
    try:
        server.wait_until_healthy()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    server = start_server(tmp_path_factory.mktemp("mlflow_server"))
    try:
        yield server
    finally:
        server.stop()
