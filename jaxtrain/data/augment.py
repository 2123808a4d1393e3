"""Image augmentation inside the compiled train step, driven by the step's key.

Each function maps `(key, images) -> images` for a batch of `(N, H, W)` or `(N, H, W, C)`
images, one independent draw per example, and is pure `jax.numpy` (jit, vmap and
sharding as any other op). `with_augmentation(loss_fn, spec)` applies the configured
ones to `batch['image']` inside the loss, with a key folded from the step's key
(`TrainState.step_rng`): the augmented batch of step s is a function of (seed, s), so a
resumed run repeats it bit for bit, and a run without augmentation is unchanged.

Config (`data: {name: ..., augment: {...}}`), applied in this order:

    crop: 0       # zero-pad each side by this many pixels, cut a random input-sized window
    flip: false   # horizontal flip with probability 1/2 (refused where the data set says
                  # mirrored images change their class: digits)
    rotate: 0.0   # rotation by an angle uniform in [-rotate, rotate] degrees (bilinear,
                  # zeros outside)
    noise: 0.0    # additive Gaussian noise of this standard deviation
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.ndimage import map_coordinates

from ..errors import JaxtrainError

# key -> (accepted types, default, what it must be)
AUGMENT = {
    "crop": ((int,), 0, "an integer >= 0 (padding in pixels)"),
    "flip": ((bool,), False, "true or false"),
    "rotate": ((int, float), 0.0, "a number of degrees in [0, 180]"),
    "noise": ((int, float), 0.0, "a standard deviation >= 0"),
}
STREAM = 0x617567  # folded into the step's key: augmentation draws its own numbers


def _spatial(images, name: str):
    if images.ndim not in (3, 4):
        raise JaxtrainError(f"augment.{name} needs images shaped (N, H, W) or (N, H, W, C), "
                            f"got shape {tuple(images.shape)}")


def random_crop(key, images, padding: int):
    """Zero-pad each side by `padding` pixels and cut a random window of the input size
    (an independent offset per example)."""
    _spatial(images, "crop")
    if padding == 0:
        return images
    n, h, w = images.shape[:3]
    if padding >= min(h, w):  # most windows would be padding alone
        raise JaxtrainError(f"augment.crop: padding {padding} must be smaller than the "
                            f"images' {h}x{w} size")
    extra = images.shape[3:]
    padded = jnp.pad(images, [(0, 0), (padding, padding), (padding, padding)]
                     + [(0, 0)] * len(extra))
    offsets = jax.random.randint(key, (n, 2), 0, 2 * padding + 1)

    def cut(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1]) + (0,) * len(extra),
                                     (h, w, *extra))

    return jax.vmap(cut)(padded, offsets)


def horizontal_flip(key, images, probability: float = 0.5):
    """Mirror each image left-right with `probability`."""
    _spatial(images, "flip")
    flips = jax.random.bernoulli(key, probability, (images.shape[0],))
    return jnp.where(flips.reshape(-1, *[1] * (images.ndim - 1)), images[:, :, ::-1], images)


def rotate_image(image, degrees):
    """One `(H, W)` or `(H, W, C)` image rotated counter-clockwise by `degrees` about its
    centre, bilinear, zeros outside (as `scipy.ndimage.rotate(..., reshape=False,
    order=1, mode='grid-constant')`)."""
    h, w = image.shape[:2]
    angle = jnp.deg2rad(degrees)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32),
                              jnp.arange(w, dtype=jnp.float32), indexing="ij")
    y, x = rows - (h - 1) / 2, cols - (w - 1) / 2
    source = [cos * y + sin * x + (h - 1) / 2, -sin * y + cos * x + (w - 1) / 2]

    def sample(plane):
        return map_coordinates(plane, source, order=1, mode="constant", cval=0.0)

    if image.ndim == 2:
        return sample(image)
    return jax.vmap(sample, in_axes=-1, out_axes=-1)(image)


def random_rotation(key, images, max_degrees: float):
    """Rotate each image by an angle uniform in [-max_degrees, max_degrees]."""
    _spatial(images, "rotate")
    if max_degrees == 0:
        return images
    angles = jax.random.uniform(key, (images.shape[0],), minval=-max_degrees,
                                maxval=max_degrees)
    return jax.vmap(rotate_image)(images.astype(jnp.float32), angles).astype(images.dtype)


def gaussian_noise(key, images, std: float):
    """Add N(0, std^2) noise to every pixel."""
    if std == 0:
        return images
    return images + (std * jax.random.normal(key, images.shape)).astype(images.dtype)


def check_augment(spec, data_info: dict | None = None, where: str = "data.augment") -> dict:
    """The augment section with defaults filled in; a wrong key, type or value, or a flip
    the data set forbids (`info['flip'] is False`), raises naming the key."""
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise JaxtrainError(f"config key {where!r} must be a mapping (e.g. {{crop: 1, "
                            f"rotate: 10}}), got {spec!r}")
    unknown = sorted(set(spec) - set(AUGMENT))
    if unknown:
        raise JaxtrainError(f"unknown config key '{where}.{unknown[0]}' (valid: "
                            f"{', '.join(AUGMENT)})")
    out = {}
    for key, (types, default, must) in AUGMENT.items():
        value = spec.get(key, default)
        bad = (isinstance(value, bool) and bool not in types) or not isinstance(value, types)
        if not bad and key != "flip":
            bad = not math.isfinite(value) or value < 0 or (key == "rotate" and value > 180)
        if bad:
            raise JaxtrainError(f"config key '{where}.{key}' must be {must}, got {value!r}")
        out[key] = value
    if out["flip"] and data_info is not None and data_info.get("flip") is False:
        raise JaxtrainError(f"config key '{where}.flip': this data set's classes change "
                            "when mirrored (e.g. digits); leave flip off")
    return out


def augmenter(spec: dict):
    """`(key, images) -> images` applying a checked spec's augmentations in order."""
    def apply(key, images):
        k_crop, k_flip, k_rot, k_noise = jax.random.split(key, 4)
        images = random_crop(k_crop, images, spec["crop"])
        if spec["flip"]:
            images = horizontal_flip(k_flip, images)
        images = random_rotation(k_rot, images, spec["rotate"])
        return gaussian_noise(k_noise, images, spec["noise"])

    return apply


def active(spec: dict | None) -> bool:
    """Whether a checked spec changes anything."""
    return bool(spec) and any(spec[k] != AUGMENT[k][1] for k in AUGMENT)


def with_augmentation(loss_fn, spec: dict | None):
    """`loss_fn(model, batch, rng)` on `batch['image']` augmented as `spec` says, with a
    key folded from the step's `rng` (which `loss_fn` still receives unchanged);
    `loss_fn` itself when `spec` augments nothing."""
    if not active(spec):
        return loss_fn
    apply = augmenter(spec)

    def augmented(model, batch, rng):
        image = apply(jax.random.fold_in(rng, STREAM), batch["image"])
        return loss_fn(model, {**batch, "image": image}, rng)

    return augmented
