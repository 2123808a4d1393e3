"""Write scikit-learn's 8x8 digits as PNG files in a class-per-folder tree, the layout
`jaxtrain data prepare images` reads:  python examples/digit_folders.py OUT_DIR"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def write_digit_folders(out) -> int:
    """OUT/0/00000.png ... OUT/9/...: grayscale, 0-16 scaled to 0-255; the image count."""
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = Path(out) / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.round(image * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:05d}.png")
    return len(digits.target)


if __name__ == "__main__":
    print(f"wrote {write_digit_folders(sys.argv[1])} images under {sys.argv[1]}")
