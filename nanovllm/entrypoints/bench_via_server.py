"""`nanovllm bench --via-server`: the seed workload as concurrent HTTP requests to a local server.

The server runs in the bench's process on the engine that was just measured offline (uvicorn in a thread, the
engine loop in its own); the client is a separate process (asyncio + httpx, every request at once), so its
work does not compete with the engine's for the GIL. Throughput counts the completion tokens the responses
report, over the wall time from the first request sent to the last response read, measured by the client.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time


def run_via_server(llm, prompts: list[list[int]], max_tokens: list[int], temperature: float = 0.6,
                   timeout: float = 3600.0) -> dict:
    """{"output_tokens", "seconds", "tokens_per_s", "requests"} of the workload sent through the HTTP API."""
    import httpx
    import uvicorn

    from nanovllm.async_llm import AsyncLLM
    from nanovllm.entrypoints.openai.api_server import bind_socket, build_app
    sock = bind_socket("127.0.0.1", 0)  # a free port, held from now on (no window for another process to take it)
    port = sock.getsockname()[1]
    app = build_app(AsyncLLM(llm=llm), "bench")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="nanovllm-bench-server",
                              daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the bench's server did not start within 60 s")
            time.sleep(0.1)
        workload = json.dumps({"url": url, "prompts": prompts, "max_tokens": max_tokens,
                               "temperature": temperature})
        done = subprocess.run([sys.executable, "-m", "nanovllm.entrypoints.bench_via_server"], input=workload,
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"the bench client failed: {done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        server.should_exit = True
        thread.join(30)


async def send_all(url: str, prompts, max_tokens, temperature: float) -> dict:
    import httpx
    limits = httpx.Limits(max_connections=len(prompts) + 1, max_keepalive_connections=len(prompts) + 1)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=None) as client:
        async def one(prompt, n):
            body = {"model": "bench", "prompt": prompt, "max_tokens": n, "temperature": temperature,
                    "ignore_eos": True}
            response = await client.post("/v1/completions", json=body)
            response.raise_for_status()
            return response.json()["usage"]["completion_tokens"]

        await one([1, 2, 3, 4], 8)  # warm-up: connections and the server's first request
        start = time.perf_counter()
        counts = await asyncio.gather(*(one(p, n) for p, n in zip(prompts, max_tokens)))
        seconds = time.perf_counter() - start
    return {"output_tokens": sum(counts), "seconds": round(seconds, 3),
            "tokens_per_s": round(sum(counts) / seconds, 1), "requests": len(prompts)}


if __name__ == "__main__":
    job = json.loads(sys.stdin.read())
    print(json.dumps(asyncio.run(send_all(job["url"], job["prompts"], job["max_tokens"], job["temperature"]))))
