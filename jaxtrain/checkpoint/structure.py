"""What a checkpoint holds, compared with what a restore expects: model signatures and
pytree structures, described as missing / extra / mis-shaped paths."""

from __future__ import annotations

import jax

from ..transforms.paths import path_str


def path_shapes(tree) -> dict[str, list[int]]:
    """`{'a/b/c': shape}` for every array-like leaf (arrays, ShapeDtypeStructs, Orbax
    array metadata) of `tree`."""
    return {
        path_str(kp): list(getattr(leaf, "shape", ()))
        for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def shape_mismatch(saved: dict, wanted: dict, limit: int = 5) -> str | None:
    """One line naming the paths `wanted` lacks in `saved` (missing), the saved paths it
    does not expect (extra) and those whose shapes differ (mis-shaped), or None."""
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    shaped = sorted(p for p in set(saved) & set(wanted) if list(saved[p]) != list(wanted[p]))

    def some(paths):
        more = f" (+{len(paths) - limit} more)" if len(paths) > limit else ""
        return ", ".join(paths[:limit]) + more

    parts = []
    if missing:
        parts.append(f"missing {some(missing)}")
    if extra:
        parts.append(f"extra {some(extra)}")
    if shaped:
        detail = [f"{p} {list(saved[p])} vs {list(wanted[p])}" for p in shaped]
        parts.append(f"mis-shaped {some(detail)}")
    return "; ".join(parts) or None


def model_signature(config: dict, params) -> dict:
    """What identifies a model: its config and the shape of every param, by path."""
    return {"config": config, "param_shapes": path_shapes(params)}


def signature_mismatch(saved: dict, current: dict) -> str | None:
    """A one-line description of how two model signatures differ, or None."""
    problem = shape_mismatch(saved.get("param_shapes", {}), current.get("param_shapes", {}))
    if problem is None and saved.get("config") != current.get("config"):
        problem = f"config {saved.get('config')} vs {current.get('config')}"
    return problem
