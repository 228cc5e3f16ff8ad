"""One machine: `python -m serve` starts a local Ray, the chat app, and prints demo keys.

    python -m serve                                   # file store under ~/.cache/yollava/store, the mini model
    python -m serve --store s3://bucket/prefix --s3-endpoint-url http://127.0.0.1:9000 --model tiny
    python -m serve --keys keys.json                  # your own keys (python -m serve.keys create ...)

Without --keys, a fresh keys file with one key per demo tenant is made for
this run and the keys are printed (they are not stored anywhere in clear).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from serve.keys import create_key

DEFAULT_STORE = Path.home() / ".cache" / "yollava" / "store"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default=DEFAULT_STORE.as_uri(), help="s3://bucket/prefix or file:///path")
    p.add_argument("--model", default="mini", help="Hugging Face id, local path, mini (the shipped miniature model) or tiny (random)")
    p.add_argument("--keys", default=None, help="API keys file; default: demo keys for this run")
    p.add_argument("--demo-tenants", default="alice,bob", help="tenants given demo keys (without --keys)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--s3-endpoint-url", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--cache-mb", type=float, default=256)
    p.add_argument("--revalidate-s", type=float, default=1.0)
    p.add_argument("--max-batch-size", type=int, default=32)
    return p.parse_args(argv)


def prepare(ns: argparse.Namespace) -> tuple[dict, dict[str, str]]:
    """(AppArgs fields, demo keys by tenant); makes the local store folder and the demo keys file."""
    if ns.store.startswith("file://"):
        Path(ns.store[len("file://"):]).mkdir(parents=True, exist_ok=True)
    demo: dict[str, str] = {}
    keys = ns.keys
    if keys is None:
        keys = str(Path(tempfile.mkdtemp(prefix="yollava-keys-")) / "keys.json")
        demo = {t: create_key(keys, t) for t in ns.demo_tenants.split(",") if t}
    args = {"store": ns.store, "keys": keys, "model": ns.model, "dtype": ns.dtype,
            "s3_endpoint_url": ns.s3_endpoint_url, "cache_mb": ns.cache_mb, "revalidate_s": ns.revalidate_s,
            "max_batch_size": ns.max_batch_size}
    return args, demo


def main(argv: list[str] | None = None) -> int:
    ns = parse(argv)
    args, demo = prepare(ns)

    from serve.app import AppArgs
    from serve.local import start

    app = start(AppArgs(**args), ns.host, ns.port)
    url = app.url
    print(f"\nYo'LLaVA chat on {url}/v1 (model {ns.model}, store {ns.store})")
    for tenant, key in demo.items():
        print(f"  demo key for {tenant}: {key}")
    print(f"  try: curl {url}/v1/models -H 'Authorization: Bearer <key>'\n  Ctrl-C to stop.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        app.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
