"""The main job end to end on one machine: personalize, serve, chat, shut down.

    python -m serve.demo [--workdir runs/demo] [--model tiny]

1. writes sample photos (two owners, three subjects each, and a negative pool);
2. personalizes every subject with `cluster.personalize` on a local Ray into a
   `file://` artifact store (progress bar, summary table);
3. starts the chat service (Ray Serve, OpenAI-compatible) with a demo key per owner;
4. alice sends a photo of her `<bo>`, asks whether `<bo>` is in it and asks about
   her `<mug>`; bob asks a text question about his `<bike>`; both through the
   official `openai` client;
5. prints the answers and each subject's held-out recognition accuracy, and shuts
   everything down.

The default model is `tiny`, a random-weight LLaVA built in code: the
plumbing is real, the answers are noise until the miniature model ships.
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPE = {"num_latent": 4, "epochs": 2, "hard_negatives": 4, "easy_negatives": 4, "positive_questions": 1,
          "attribute_questions": 2, "max_answer_tokens": 8, "near_duplicate": 1.0}


def step(n: int, text: str) -> None:
    print(f"\n=== [{n}/5] {text}", flush=True)


def write_request(work: Path, model: str) -> Path:
    photos = (work / "photos").resolve()  # paths in a request are relative to the request file
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_sample_photos.py"), str(photos)], check=True)
    subjects = [{"owner": owner, "name": name, "photos": str(photos / owner / name)}
                for owner in ("alice", "bob") for name in sorted(p.name for p in (photos / owner).iterdir())]
    request = {"base_model": model, "store": (work / "store").resolve().as_uri(), "recipe": RECIPE,
               "negatives": str(photos / "pool"), "subjects": subjects}
    path = work / "request.yaml"
    path.write_text(yaml.safe_dump(request, sort_keys=False))
    print(f"request: {path} ({len(subjects)} subjects of 2 owners)")
    return path


def personalize(request: Path, job_id: str) -> dict:
    from cluster.personalize import main as run
    from cluster.store import open_store

    rc = run([str(request), "--pack-size", "3", "--job-id", job_id])
    if rc == 2:
        raise SystemExit("the request was refused (see the error above)")
    store = open_store(yaml.safe_load(request.read_text())["store"])
    summary = store.get_json(f"jobs/{job_id}/summary.json")
    if rc != 0:
        raise SystemExit(f"personalization failed: {summary['counts']}")
    return summary


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def chat(work: Path, store_uri: str, model: str) -> list[tuple[str, str, str]]:
    from openai import OpenAI

    from serve.app import AppArgs
    from serve.keys import create_key
    from serve.local import start

    keys_file = work / "keys.json"
    keys_file.unlink(missing_ok=True)
    keys = {t: create_key(keys_file, t) for t in ("alice", "bob")}
    for t, k in keys.items():
        print(f"demo key for {t}: {k}")
    app = start(AppArgs(store=store_uri, keys=str(keys_file), model=model))
    try:
        print(f"chat service on {app.url}/v1")
        photo = sorted((work / "photos" / "alice" / "bo").iterdir())[0]
        asks = [("alice", [{"type": "image_url", "image_url": {"url": data_url(photo)}},
                           {"type": "text", "text": "Is <bo> in this photo? And what should I buy <mug>?"}]),
                ("bob", "What should I buy <bike> for its birthday?")]
        out = []
        for tenant, content in asks:
            client = OpenAI(base_url=f"{app.url}/v1", api_key=keys[tenant], max_retries=2, timeout=120)
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                               max_tokens=24, temperature=0)
            text = content if isinstance(content, str) else f"[photo {photo.name}] {content[1]['text']}"
            out.append((tenant, text, r.choices[0].message.content))
        return out
    finally:
        app.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serve.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument("--model", default="tiny")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    import ray

    # one local Ray for both steps; workers' and replicas' logs stay in Ray's log folder
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    step(1, "sample photos and a personalization request")
    request = write_request(work, args.model)
    step(2, "batch personalization on a local Ray (cluster.personalize)")
    summary = personalize(request, job_id=f"demo-{int(time.time())}")
    step(3, "chat service (Ray Serve) with a demo key per owner")
    answers = chat(work, summary["store"], args.model)
    step(4, "answers")
    for tenant, question, answer in answers:
        print(f"{tenant}: {question}\n  -> {answer!r}")
    step(5, "held-out recognition accuracy per subject (from the job)")
    for r in summary["subjects"]:
        m = r.get("metrics") or {}
        print(f"  {r['owner']}/{r['name']:<8} {r['status']:<12} v{r.get('version', '-')}  "
              f"weighted={m.get('weighted', float('nan')):.3f} (positive={m.get('positive_acc', float('nan')):.3f}, "
              f"negative={m.get('negative_acc', float('nan')):.3f})")
    if args.model == "tiny":
        print("\nnote: `tiny` has random weights: the answers and accuracies above are chance-level by design.")
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 1), "counts": summary["counts"]}))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
