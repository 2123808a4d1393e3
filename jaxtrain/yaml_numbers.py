"""YAML as people write it: `3e-4` is a number (PyYAML's YAML 1.1 rules read it as text).

A leaf module (like `errors`), usable from every layer.
"""

from __future__ import annotations

import re

import yaml


class Loader(yaml.SafeLoader):
    """`yaml.SafeLoader` that also reads exponent floats without a dot (`3e-4`, `1E5`)."""


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$"
               r"|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def load(text: str):
    """Parse YAML text with `Loader` (raises `yaml.YAMLError` on bad YAML)."""
    return yaml.load(text, Loader=Loader)
