"""Concepts trained with the official Yo'LLaVA code, in and out of a store.

    python -m cluster.official import --token E-token.pt --lmhead E-lmhead.pt --model MODEL
        --owner OWNER --name NAME --store URI [--version V] [--dtype D] [--sks-name SKS]
    python -m cluster.official import --from DIR --epoch E ...            # DIR/E-token.pt, DIR/E-lmhead.pt
    python -m cluster.official export --store URI --owner OWNER --name NAME [--version V] --out DIR
        [--epoch best] [--dtype float16]
    python -m cluster.official export --concept DIR --out DIR ...         # a folder written by yollava.train

`import` reads the pair with `torch.load(weights_only=True)` (anything but a
plain tensor is refused), loads the named base model (by path, Hugging Face
id, `mini` or `tiny`) to check the row width and take its fingerprint, and
stores a normal artifact (safetensors + manifest, `source` naming the files
and their sha256) for the owner and name, in any store (`file://`, `s3://`).
Load the base with the dtype the chat service will use (`--dtype`): the
fingerprint includes it. `export` writes `{epoch}-token.pt` and
`{epoch}-lmhead.pt` as the official code does, for its `test-sks.py`
(`--sks_name NAME --prefix_token K`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cluster.store import ConceptNotFound, open_store
from yollava.artifacts import ConceptArtifact, load_concept
from yollava.backbone import BackboneError, load_backbone
from yollava.official import DTYPES, official_paths, read_official, write_official
from yollava.tokens import check_name


def import_official(token_file: str, lmhead_file: str, model: str, owner: str, name: str, store_uri: str,
                    version: int | None = None, dtype: str | None = None, sks_name: str | None = None) -> dict:
    check_name(owner, "owner")
    check_name(name, "name")
    backbone = load_backbone(model, dtype=dtype)
    pair = read_official(token_file, lmhead_file, hidden_size=backbone.hidden_size)
    source = pair.source()
    if sks_name:
        source["sks_name"] = sks_name
    artifact = ConceptArtifact(owner, pair.to_rows(name), model, backbone.fingerprint, source=source)
    store = open_store(store_uri)
    v = store.put_concept(artifact, version)
    return {"concept": f"{owner}/{name}", "version": v, "num_latent": pair.num_latent, "d": pair.hidden_size,
            "base_model": model, "base_fingerprint": backbone.fingerprint, "store": store.uri, "source": source}


def export_official(out: str, epoch: str = "best", dtype: str = "float32", *, store_uri: str | None = None,
                    owner: str | None = None, name: str | None = None, version: int | None = None,
                    concept_dir: str | None = None) -> dict:
    if concept_dir:
        art = load_concept(concept_dir)
    else:
        art = open_store(store_uri).get_concept(owner, name, version)
    token_path, lmhead_path = write_official(art.rows, out, epoch, DTYPES[dtype])
    k = art.rows.tokens.num_latent
    return {"concept": f"{art.owner}/{art.name}", "version": art.version, "token": str(token_path),
            "lmhead": str(lmhead_path), "num_latent": k, "dtype": dtype, "base_model": art.base_model,
            "official_test": f"--sks_name {art.name} --prefix_token {k} --epoch {epoch}"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster.official", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="official {epoch}-token.pt / {epoch}-lmhead.pt -> a stored concept")
    imp.add_argument("--token", help="the {epoch}-token.pt file")
    imp.add_argument("--lmhead", help="the {epoch}-lmhead.pt file")
    imp.add_argument("--from", dest="folder", help="folder holding {epoch}-token.pt and {epoch}-lmhead.pt")
    imp.add_argument("--epoch", default="best", help="with --from: a number or best (default)")
    imp.add_argument("--model", required=True, help="the base model: HF id, local path, mini or tiny")
    imp.add_argument("--dtype", default=None, help="dtype the base is loaded in (as the chat service will)")
    imp.add_argument("--owner", required=True)
    imp.add_argument("--name", required=True, help="the concept's name here: <NAME> in prompts")
    imp.add_argument("--sks-name", help="its name in the official code (recorded in the manifest)")
    imp.add_argument("--store", required=True, help="file:///abs/path, a local path or s3://bucket/prefix")
    imp.add_argument("--version", type=int, help="store as this version (default: the next one)")
    exp = sub.add_parser("export", help="a concept -> official {epoch}-token.pt / {epoch}-lmhead.pt")
    exp.add_argument("--store", help="the store to read from (with --owner and --name)")
    exp.add_argument("--owner")
    exp.add_argument("--name")
    exp.add_argument("--version", type=int, help="default: the latest")
    exp.add_argument("--concept", help="instead of a store: a concept folder (manifest.json + concept.safetensors)")
    exp.add_argument("--out", required=True, help="folder to write the two files into")
    exp.add_argument("--epoch", default="best", help="the files' epoch prefix: a number or best (default)")
    exp.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = ap.parse_args(argv)
    try:
        if args.cmd == "import":
            if args.folder and (args.token or args.lmhead):
                ap.error("give --from DIR or --token and --lmhead, not both")
            if args.folder:
                token, lmhead = official_paths(args.folder, args.epoch)
            elif args.token and args.lmhead:
                token, lmhead = args.token, args.lmhead
            else:
                ap.error("give --token and --lmhead, or --from DIR [--epoch E]")
            report = import_official(str(token), str(lmhead), args.model, args.owner, args.name, args.store,
                                     args.version, args.dtype, args.sks_name)
        else:
            from_store = [args.store, args.owner, args.name]
            if args.concept and any(from_store):
                ap.error("give --concept DIR or --store with --owner and --name, not both")
            if not args.concept and not all(from_store):
                ap.error("give --store, --owner and --name (or --concept DIR)")
            report = export_official(args.out, args.epoch, args.dtype, store_uri=args.store, owner=args.owner,
                                     name=args.name, version=args.version, concept_dir=args.concept)
    # bad files, names, shapes, stores (ValueError: OfficialFormatError, ArtifactError among them),
    # a base that does not load, a concept the store does not hold: a message, exit 2
    except (ValueError, BackboneError, ConceptNotFound) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
