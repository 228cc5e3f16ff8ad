"""The main job end to end on one machine: personalize, serve, chat, shut down.

    python -m serve.demo [--workdir runs/demo] [--model mini] [--keep [--port 8000]]

1. a personalization request for the miniature world's sample subjects
   (`examples/miniworld`: two owners, three subjects each, and a negative pool);
2. personalizes every subject with `cluster.personalize` on a local Ray into a
   `file://` artifact store (progress bar, summary table);
3. starts the chat service (Ray Serve, OpenAI-compatible) with a demo key per owner;
4. ana sends a held-out photo of her `<pip>` and one of its twin (the same object
   but for a notch no word names) and asks whether `<pip>` is in each; ben asks
   a text question about his `<rex>`; all through the official `openai` client;
5. prints the answers and each subject's held-out recognition (the evaluation
   harness on the test photos: the concept against the bare name), and shuts
   everything down; with `--keep` (`make demo KEEP=1`) it prints the web page's
   address and keys instead, and the service, its page and its upload queue
   stay up until Ctrl-C.

The default model is `mini`, the miniature LLaVA shipped in
`models/mini` (see its card); `--model tiny` runs the same
plumbing on random weights.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "examples" / "miniworld"  # written by `python -m miniworld.subjects`
RECIPE_FILE = ROOT / "examples" / "mini-recipe.yaml"
OWNERS = ("ana", "ben")


def load_meta(root: Path = SAMPLES) -> dict:
    return json.loads((root / "subjects.json").read_text())


def step(n: int, text: str) -> None:
    print(f"\n=== [{n}/5] {text}", flush=True)


def write_request(work: Path, model: str) -> Path:
    meta = load_meta(SAMPLES)
    subjects = [{"owner": m["owner"], "name": m["name"], "description": m["description"],
                 "photos": str(SAMPLES / "train" / m["name"])} for m in meta["subjects"]]
    # the recipe file as it is (the paper's structure, chosen on development subjects)
    recipe = {"from": str(RECIPE_FILE)}
    request = {"base_model": model, "store": (work / "store").resolve().as_uri(), "recipe": recipe,
               "negatives": str(SAMPLES / "pool"), "subjects": subjects}
    path = work / "request.yaml"
    path.write_text(yaml.safe_dump(request, sort_keys=False))
    print(f"request: {path} ({len(subjects)} subjects of {len(OWNERS)} owners)")
    return path


def run_job(request: Path, job_id: str) -> dict:
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


def chat(work: Path, store_uri: str, model: str, keep: bool = False, port: int | None = None):
    """The questions, through the official client; returns (answers, keys, the app if kept up)."""
    from openai import OpenAI

    from serve.app import AppArgs
    from serve.keys import create_key
    from serve.local import start

    keys_file = work / "keys.json"
    keys_file.unlink(missing_ok=True)
    keys = {t: create_key(keys_file, t) for t in OWNERS}
    for t, k in keys.items():
        print(f"demo key for {t}: {k}")
    # Kept up, the page can teach new concepts: uploads go to jobs on this Ray (its job API).
    uploads = {"queue": {"min_batch": 1, "max_wait_s": 5, "max_active_jobs": 1, "negatives": str(SAMPLES / "pool"),
                         "recipe": {"from": str(RECIPE_FILE)}}} if keep else None
    app = start(AppArgs(store=store_uri, keys=str(keys_file), model=model, uploads=uploads), port=port)
    question = "Is <pip> in this photo? Answer with yes or no."
    pip = SAMPLES / "test" / "pip" / "0.png"
    twin = SAMPLES / "test" / "pip" / "negatives" / "hard" / "0.png"
    try:
        print(f"chat service on {app.url}/v1")
        asks = [("ana", pip, question), ("ana", twin, question), ("ben", None, "What colour is <rex>?")]
        out = []
        for tenant, photo, text in asks:
            content = text if photo is None else [
                {"type": "image_url", "image_url": {"url": data_url(photo)}}, {"type": "text", "text": text}]
            client = OpenAI(base_url=f"{app.url}/v1", api_key=keys[tenant], max_retries=2, timeout=120)
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                               max_tokens=24, temperature=0)
            shown = text if photo is None else f"[{photo.relative_to(SAMPLES)}] {text}"
            out.append((tenant, shown, r.choices[0].message.content))
    except BaseException:
        app.stop()
        raise
    if not keep:
        app.stop()
    return out, keys, app if keep else None


def held_out(store_uri: str, model: str) -> list[dict]:
    """Recognition on the sample subjects' test photos: each trained concept vs the bare name."""
    from cluster.store import open_store
    from yollava.backbone import load_backbone
    from yollava.data import YollavaDataset
    from yollava.evaluate import Evaluator, Prompting

    backbone = load_backbone(model)
    store = open_store(store_uri)
    ds = YollavaDataset.load(SAMPLES)
    subjects = load_meta(SAMPLES)["subjects"]
    arts = {m["name"]: store.get_concept(m["owner"], m["name"]) for m in subjects}
    ev = Evaluator(backbone, ds, {name: art.rows for name, art in arts.items()}, progress=False)  # one feature cache
    rows = []
    for m in subjects:
        rec = {"vanilla": ev.recognition(Prompting([], [], []), m["name"]),
               "concept": ev.recognition(ev.prompting("concept", m["name"]), m["name"])}
        rows.append({"subject": f"{m['owner']}/{m['name']}", "version": arts[m["name"]].version,
                     **{k: v["likelihood"]["weighted_accuracy"] for k, v in rec.items()},
                     "concept_hard": rec["concept"]["negative_by_kind"].get("hard")})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serve.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument("--model", default="mini")
    ap.add_argument("--keep", action="store_true", help="leave the service and its page running (Ctrl-C stops)")
    ap.add_argument("--port", type=int, default=None, help="the service's port with --keep (default 8000)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    import ray

    # one local Ray for both steps; workers' and replicas' logs stay in Ray's log folder. Kept up, its
    # dashboard is the job API the upload queue submits to, and jobs need CPUs beside the replicas.
    ray.init(include_dashboard=args.keep, log_to_driver=False, logging_level="WARNING",
             **({"num_cpus": max(4, os.cpu_count() or 1)} if args.keep else {}))
    step(1, "a personalization request for the sample subjects")
    request = write_request(work, args.model)
    step(2, "batch personalization on a local Ray (cluster.personalize)")
    summary = run_job(request, job_id=f"demo-{int(time.time())}")
    step(3, "chat service (Ray Serve) with a demo key per owner")
    answers, keys, app = chat(work, summary["store"], args.model, args.keep, args.port or (8000 if args.keep else None))
    step(4, "answers")
    for tenant, question, answer in answers:
        print(f"{tenant}: {question}\n  -> {answer!r}")
    step(5, "held-out recognition per subject (test photos; weighted = mean of positive and negative accuracy)")
    rows = held_out(summary["store"], args.model)
    for r in rows:
        print(f"  {r['subject']:<9} v{r['version']}  concept={r['concept']:.3f}  name alone={r['vanilla']:.3f}  "
              f"twins rejected={r['concept_hard']:.3f}")
    if args.model == "tiny":
        print("\nnote: `tiny` has random weights: the answers and accuracies above are chance-level by design.")
    mean = {k: round(sum(r[k] for r in rows) / len(rows), 3) for k in ("concept", "vanilla", "concept_hard")}
    mean["twins_rejected"] = mean.pop("concept_hard")
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 1), "counts": summary["counts"],
                      "held_out_weighted": mean}))
    if app is None:
        print("\nthe web page: `make demo KEEP=1` (python -m serve.demo --keep) leaves the service up and prints "
              "its address; `python -m serve` starts one on its own", flush=True)
        ray.shutdown()
        return 0
    print(f"\nthe web page: {app.url}/  (teach a concept from photos, chat with it)", flush=True)
    for t, k in keys.items():
        print(f"  key for {t}: {k}", flush=True)
    print("  Ctrl-C stops it.", flush=True)
    app.serve_until_interrupted()
    return 0


if __name__ == "__main__":
    sys.exit(main())
