"""Run the server in a background thread (tests, benchmarks, notebooks)::

    from wsi_llava.serve.app import create_app
    from wsi_llava.serve.config import ServeConfig
    from wsi_llava.serve.live import running

    with running(create_app(ServeConfig(model="runs/stage3", slides_root="data/slides"))) as base_url:
        ...  # e.g. OpenAI(base_url=base_url + "/v1", api_key="unused")
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def running(app, host: str = "127.0.0.1", start_timeout: float = 60.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn on ``host`` and a free port; yields ``http://host:port``; stops the
    server (and the app's batch worker) on exit."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", server_header=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="wsi-llava-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError("the server did not start (see the log above)")
        time.sleep(0.02)
    try:
        yield f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
