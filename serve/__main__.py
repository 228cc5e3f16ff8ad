"""One machine: `python -m serve` starts a local Ray, the chat app, and prints demo keys.

    python -m serve                                   # file store under ~/.cache/yollava/store, the mini model
    python -m serve --store s3://bucket/prefix --s3-endpoint-url http://127.0.0.1:9000 --model tiny
    python -m serve --keys keys.json                  # your own keys (python -m serve.keys create ...)
    python -m serve --no-uploads                      # chat only: no POST /v1/concepts, no training queue

The page is at the printed address (`/`); uploads are trained by jobs on this
Ray (its job API), with examples/mini-recipe.yaml and the miniature pool.

Without --keys, a fresh keys file with one key per demo tenant is made for
this run and the keys are printed (they are not stored anywhere in clear).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from serve.keys import create_key

DEFAULT_STORE = Path.home() / ".cache" / "yollava" / "store"
ROOT = Path(__file__).resolve().parents[1]
MINI_RECIPE = ROOT / "examples" / "mini-recipe.yaml"
MINI_POOL = ROOT / "examples" / "miniworld" / "pool"


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
    p.add_argument("--no-uploads", action="store_true", help="no upload API (POST /v1/concepts) and no queue")
    p.add_argument("--recipe", default=str(MINI_RECIPE) if MINI_RECIPE.is_file() else None,
                   help="recipe file of the uploads' training jobs (default: examples/mini-recipe.yaml)")
    p.add_argument("--negatives", default=str(MINI_POOL) if MINI_POOL.is_dir() else None,
                   help="negative pool of the uploads' training jobs (default: examples/miniworld/pool)")
    p.add_argument("--min-batch", type=int, default=1, help="submit a training job once this many uploads wait")
    p.add_argument("--max-wait-s", type=float, default=10.0, help="... or once the oldest has waited this long")
    return p.parse_args(argv)


def upload_args(ns: argparse.Namespace) -> dict | None:
    """AppArgs.uploads for one machine: a job as soon as an upload waits (it is the only one)."""
    if ns.no_uploads:
        return None
    queue = {"min_batch": ns.min_batch, "max_wait_s": ns.max_wait_s, "max_active_jobs": 1}
    if ns.recipe:
        queue["recipe"] = {"from": ns.recipe}
    if ns.negatives:
        queue["negatives"] = ns.negatives
    return {"queue": queue}


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
            "max_batch_size": ns.max_batch_size, "uploads": upload_args(ns)}
    return args, demo


def main(argv: list[str] | None = None) -> int:
    ns = parse(argv)
    args, demo = prepare(ns)

    from serve.app import AppArgs
    from serve.local import start

    app = start(AppArgs(**args), ns.host, ns.port)
    url = app.url
    print(f"\nYo'LLaVA chat on {url}/v1 (model {ns.model}, store {ns.store})")
    print(f"  the page: {url}/  (enter a key, teach a concept from photos, chat)")
    for tenant, key in demo.items():
        print(f"  demo key for {tenant}: {key}")
    print(f"  try: curl {url}/v1/models -H 'Authorization: Bearer <key>'\n  Ctrl-C to stop.", flush=True)
    app.serve_until_interrupted()
    return 0


if __name__ == "__main__":
    sys.exit(main())
