"""Start the app on a local Ray (the laptop command, benchmarks); reuses a Ray already running."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

from serve.app import AppArgs, build_app

APP_NAME = "yollava"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class LocalApp:
    url: str
    started_ray: bool

    def stop(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        if self.started_ray:
            ray.shutdown()

    def serve_until_interrupted(self) -> None:
        """Keep serving until Ctrl-C, then stop."""
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()


def start(args: AppArgs, host: str = "127.0.0.1", port: int | None = None, env: dict | None = None,
          **ray_init) -> LocalApp:
    """Ray (unless running) + Serve on host:port + the app; returns once the app answers."""
    import ray
    from ray import serve

    started = not ray.is_initialized()
    if started and args.uploads is not None:
        # The dashboard is the job API the upload queue submits to; a job needs CPUs beside the
        # service's replicas (a driver task, a Ray Train worker), so a small machine gets 4 logical ones.
        ray_init.setdefault("include_dashboard", True)
        ray_init.setdefault("num_cpus", max(4, os.cpu_count() or 1))
    if started:
        ray_init.setdefault("include_dashboard", False)
        ray.init(runtime_env={"env_vars": env} if env else None, **ray_init)
    port = port or free_port(host)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False)
    return LocalApp(f"http://{host}:{port}", started)
