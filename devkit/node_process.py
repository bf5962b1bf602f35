"""``xllm serve`` nodes as processes on 127.0.0.1, for the benchmarks that need real nodes.

A node holds the packaged models from a shared dir used in place (``devkit.model_files.CACHE``) and
fetches anything else from the fake hub only; its log is JSON at warning level in ``<home>/node.log``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from devkit.model_files import CACHE
from devkit.ports import free_port
from devkit.replica_process import ROOT


@dataclass(slots=True)
class NodeProcess:
    home: Path
    proc: subprocess.Popen[bytes]

    @classmethod
    def start(
        cls, home: Path, balancers: str, key: str, hub: str, env: Mapping[str, str] | None = None
    ) -> NodeProcess:
        """Starts a node that registers with ``balancers`` (a comma list) using the node key ``key``."""
        home.mkdir(parents=True)
        full_env = {
            **os.environ,
            "LLMLB_HOME": str(home),
            "XLLM_BALANCER": balancers,
            "XLLM_API_KEY": key,
            "XLLM_LOG_LEVEL": "warning",
            "XLLM_BULK_PORT": "0",  # several nodes on this host: not the fixed default port
            "HF_ENDPOINT": hub,  # nothing may leave the machine
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        with (home / "node.log").open("ab") as log:
            proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "node.cli", "serve"),
                    *("--grpc-listen", f"127.0.0.1:{free_port()}"),
                    *("--models-dir", str(home / "models"), "--shared-dir", str(CACHE)),
                    *("--log-format", "json"),
                ],
                cwd=ROOT,
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return cls(home, proc)

    @property
    def node_id(self) -> str:
        """The id the node saved on registering; "" until then."""
        saved = self.home / "node-id"
        return saved.read_text().strip() if saved.exists() else ""

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
