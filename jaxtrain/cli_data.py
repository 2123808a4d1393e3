"""`jaxtrain data prepare {text,images,arrays}` and `jaxtrain data info`: the user's files
as prepared records (see `jaxtrain.data.prepare`), and what a prepared folder holds."""

from __future__ import annotations

import json

from .errors import JaxtrainError


def cmd_prepare(args) -> int:
    from .data import prepare

    progress = not args.quiet
    if args.kind == "text":
        manifest = prepare.prepare_text(args.inputs, args.out, args.tokenizer,
                                        args.vocab_size, args.valid_fraction, args.shard_mb,
                                        progress)
    elif args.kind == "images":
        if len(args.inputs) != 1:
            raise JaxtrainError(f"images take one ROOT folder (ROOT/CLASS/*.png), got "
                                f"{len(args.inputs)} paths")
        size = args.image_size[0] if args.image_size and len(args.image_size) == 1 else (
            args.image_size)
        manifest = prepare.prepare_images(args.inputs[0], args.out, size, args.valid_fraction,
                                          args.seed, args.shard_mb, progress)
    else:
        manifest = prepare.prepare_arrays(args.inputs, args.out, args.valid_fraction,
                                          args.seed, args.shard_mb, progress)
    print(json.dumps(_summary(manifest, args.out)))
    return 0


def cmd_info(args) -> int:
    from .data.records import read_manifest

    manifest = read_manifest(args.path, verify=True if args.verify else False)
    print(json.dumps(_summary(manifest, args.path), indent=None if args.json else 1))
    return 0


def _summary(manifest: dict, path) -> dict:
    out = {"path": str(path), "kind": manifest["kind"], "version": manifest["version"],
           "splits": {k: v["count"] for k, v in manifest["splits"].items()},
           "shards": sum(len(series) for v in manifest["splits"].values()
                         for series in v["shards"].values()),
           "features": manifest["features"]}
    for key in ("classes", "skipped"):
        if manifest.get(key):
            out[key] = manifest[key] if key != "skipped" else manifest[key]["count"]
    if manifest.get("tokenizer"):
        tok = manifest["tokenizer"]
        out["tokenizer"] = {k: tok[k] for k in ("kind", "vocab_size", "eos_id")}
    return out


def add_commands(sub, positive_int) -> None:
    """Register `jaxtrain data ...` on the `jaxtrain` parser."""
    from .cli import Parser

    data = sub.add_parser("data", help="prepare your own files for training (records read "
                                       "with Grain)")
    dsub = data.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    p = dsub.add_parser("prepare", help="tokenize text / decode images / shard arrays "
                                        "into OUT (a no-op when the input is unchanged)")
    p.add_argument("kind", choices=("text", "images", "arrays"),
                   help="text files, a class-per-folder image tree, or .npy/.npz arrays")
    p.add_argument("inputs", nargs="+", help="files, folders or globs (images: one ROOT)")
    p.add_argument("--out", required=True, help="the prepared folder to write")
    p.add_argument("--tokenizer", default="bytes",
                   help="text: bytes (default), bpe (trained here), or a tokenizer.json")
    p.add_argument("--vocab-size", type=positive_int, default=4096,
                   help="text with --tokenizer bpe: vocabulary size (default: 4096)")
    p.add_argument("--valid-fraction", type=float, default=0.1,
                   help="held out for validation (default: 0.1)")
    p.add_argument("--image-size", type=positive_int, nargs="+", metavar="N",
                   help="images: resize all to H W (or N N); default: all must match")
    p.add_argument("--seed", type=int, default=0, help="images/arrays: held-out draw")
    p.add_argument("--shard-mb", type=float, default=256, help="shard size (default: 256)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_prepare)
    i = dsub.add_parser("info", help="what a prepared folder holds (checks every file)")
    i.add_argument("path", help="a prepared folder")
    i.add_argument("--verify", action="store_true", help="also check SHA-256 checksums")
    i.add_argument("--json", action="store_true", help="one line of JSON")
    i.set_defaults(func=cmd_info)
