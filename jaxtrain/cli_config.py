"""`jaxtrain config`: a config resolved (every default filled in), every key with its type,
default and doc, and docs/config.md, all generated from the config dataclasses."""

from __future__ import annotations

from .config import format_value, keys, load, read_yaml, to_yaml
from .finetune.config import FinetuneRunConfig
from .train.config import SHORTHAND, RunConfig

REFERENCE = "docs/config.md"
REGENERATE = "jaxtrain config --markdown > docs/config.md"


def resolve(path, overrides=()):
    """The checked config of a YAML file and `key=value` overrides: a `RunConfig`, or a
    `FinetuneRunConfig` when it has a `finetune` section."""
    raw = read_yaml(path, overrides, SHORTHAND)
    return load(FinetuneRunConfig if "finetune" in raw else RunConfig, raw)


def format_keys() -> str:
    """Every key of a run config (and of a fine-tune's `finetune` section): `key  type
    default  doc`, one per line, aligned."""
    rows = [(k, t, format_value(d), doc) for k, t, d, doc in keys(FinetuneRunConfig)]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{k:<{width[0]}}  {t:<{width[1]}}  {d:<{width[2]}}  {doc}".rstrip()
                     for k, t, d, doc in rows)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def reference_markdown() -> str:
    """docs/config.md: the config reference, one table per section."""
    sections: dict[str, list] = {}
    for key, tp, default, doc in keys(FinetuneRunConfig):
        top = key.split(".")[0] if "." in key else ""
        sections.setdefault(top, []).append((key, tp, default, doc))
    lines = [
        "# Config reference",
        "",
        f"<!-- generated from the config dataclasses by `{REGENERATE}`; do not edit -->",
        "",
        "The YAML of `jaxtrain train CONFIG [key=value ...]` (and of `jaxtrain finetune`,",
        "which adds the `finetune` section). `jaxtrain config CONFIG [key=value ...]` prints",
        "a config with every default filled in; `jaxtrain config --keys` lists this table.",
        "A key's type is checked when the config is read: a wrong type, an unknown key (with",
        "the closest valid one) or a count that is not positive is refused in one line.",
        "`model`, `data` and `optimizer` are free-form: the keyword arguments of a registry",
        "entry, or the transforms spec (docs/transforms.md). From Python,",
        "`Trainer(state, loss_fn, TrainerConfig(train=TrainConfig(batch_size=32), ...))` takes",
        "the same `train`, `sharding`, `checkpoint`, `early_stopping` and `logging` sections",
        "(`jaxtrain.train.TrainerConfig`).",
    ]
    for top, rows in sections.items():
        lines += ["", f"## `{top}`" if top else "## Top level", "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        lines += [f"| `{k}` | {_cell(t)} | `{_cell(format_value(d))}` | {_cell(doc)} |"
                  for k, t, d, doc in rows]
    return "\n".join(lines) + "\n"


def cmd_config(args) -> int:
    if args.markdown:
        print(reference_markdown(), end="")
        return 0
    if args.keys:
        print(format_keys())
        return 0
    if args.config is None:
        from .errors import JaxtrainError

        raise JaxtrainError("give a CONFIG file to resolve, or --keys / --markdown")
    print(to_yaml(resolve(args.config, args.overrides)), end="")
    return 0


def add_command(sub) -> None:
    config = sub.add_parser("config", help="print a config with every default filled in; "
                                            "--keys lists every key")
    config.add_argument("config", nargs="?", help="the run's YAML config")
    config.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.steps=100")
    config.add_argument("--keys", action="store_true",
                        help="list every key with its type, default and meaning")
    config.add_argument("--markdown", action="store_true",
                        help=f"print the config reference ({REFERENCE})")
    config.set_defaults(func=cmd_config)
