"""A `nanovllm serve` subprocess on a free loopback port, for tests: started, waited for, stopped with SIGTERM."""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model: str, *args: str, api_key: str | None = None, startup_timeout: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        command = [sys.executable, "-m", "nanovllm.cli", "serve", model, "--port", str(self.port), *args]
        if api_key:
            command += ["--api-key", api_key]
        env = {**os.environ, "NANOVLLM_LOG_LEVEL": "WARNING"}
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}: {self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not answer /health within {startup_timeout} s")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def metrics(self) -> dict[str, float]:
        """The samples of /metrics by metric name (summed over labels) and by name with labels."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
                if "{" in name:
                    base = name.split("{")[0]
                    values[base] = values.get(base, 0.0) + float(value)
        return values

    def wait_idle(self, timeout: float = 20.0) -> dict[str, float]:
        """Poll /metrics until no request runs or waits and no KV block is used; the last metrics."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            busy = m["nanovllm:num_requests_running"] + m["nanovllm:num_requests_waiting"]
            if (busy == 0 and m["nanovllm:kv_cache_blocks_used"] == 0) or time.monotonic() > deadline:
                return m
            time.sleep(0.1)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then the exit code (SIGKILL and an error if it does not exit in time)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise RuntimeError(f"the server ignored SIGTERM for {timeout} s")
        return self.process.returncode
