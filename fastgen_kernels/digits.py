"""Evaluation for the digits demo: scikit-learn's 8x8 handwritten digits and a small classifier.

A class-conditional diffusion model distilled on these digits is judged like an ImageNet model is
by FID, scaled down: :class:`DigitClassifier` plays Inception, its penultimate 128 features play
the pool features, and :func:`evaluate` reports

- ``fd``: the Frechet distance (:mod:`fastgen_kernels.metrics`) between the features of generated
  images and those of real digits, and
- ``accuracy``: how often the classifier reads a generated image as the class it was asked for.

The classifier shipped in ``fastgen_kernels/assets/digits_classifier.safetensors`` was made by
``python -m fastgen_kernels.digits`` (:func:`main`). scikit-learn (which ships the 1797 digits, no
download) is imported only when the data is loaded: ``pip install --no-build-isolation -e ".[demo]"``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastgen_kernels.metrics import frechet_distance
from fastgen_kernels.serialization import save_tensors

__all__ = ["CLASSIFIER_PATH", "DigitClassifier", "evaluate", "load_classifier", "load_digits",
           "save_classifier", "train_classifier"]

CLASSIFIER_PATH = Path(__file__).resolve().parent / "assets" / "digits_classifier.safetensors"
SPLITS = ("all", "train", "test")
NUM_CLASSES = 10
FEATURE_DIM = 128
TEST_EVERY = 5   # every 5th image of each class is in the test split: 20%


def load_digits(split: str = "all") -> tuple[Tensor, Tensor]:
    """The 8x8 digits as images (N, 1, 8, 8) float32 in [-1, 1] and labels (N,) int64 in 0..9.

    Pixels p in 0..16 become p / 8 - 1. ``split``: "all" (N = 1797), "test" (N = 355) or "train"
    (N = 1442), a fixed stratified split: among the images of each class, in dataset order, those at
    positions 4, 9, 14, ... (every 5th) are test images. The rule uses no random numbers, so the
    split is the same on every machine and every torch version. Both splits keep dataset order.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as e:
        raise ImportError("the digits demo needs scikit-learn: pip install scikit-learn, or from a "
                          'checkout pip install --no-build-isolation -e ".[demo]"') from e
    pixels, labels = sklearn_load_digits(return_X_y=True)
    images = torch.from_numpy(pixels).to(torch.float32).reshape(-1, 1, 8, 8) / 8 - 1
    labels = torch.from_numpy(labels).to(torch.int64)
    if split == "all":
        return images, labels
    # position of each image among the images of its class, in dataset order
    one_hot = F.one_hot(labels, NUM_CLASSES)
    position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=1) - 1
    is_test = position % TEST_EVERY == TEST_EVERY - 1
    keep = is_test if split == "test" else ~is_test
    return images[keep], labels[keep]


class DigitClassifier(nn.Module):
    """A small CNN for (N, 1, 8, 8) digits in [-1, 1]: 3 conv layers, then 256 -> 128 -> 10.

    8x8x32 -> 8x8x64 -> max-pool -> 4x4x64 -> max-pool -> 2x2x64 = 256 -> 128 features (ReLU) ->
    10 logits; 89,930 parameters. No batch norm or dropout, so train and eval modes compute the same.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 2 * 2, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer features (N, 128) of images x (N, 1, 8, 8), as FID's pool features."""
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (N, 10) of images x (N, 1, 8, 8)."""
        return self.head(self.features(x))


def _augment(images: Tensor, noise_std: float, generator: torch.Generator) -> Tensor:
    """Shift each image (B, 1, 8, 8) by -1, 0 or +1 pixel per axis (background -1 comes in) and add
    Gaussian noise of a per-image std uniform in [0, noise_std], clamped to [-1, 1] as in evaluate.

    Generated digits are rarely centered to the pixel and carry sampling noise; a classifier that
    has seen both reads them by their shape, not by those artifacts.
    """
    b = images.shape[0]
    padded = F.pad(images[:, 0], (1, 1, 1, 1), value=-1.0)   # (B, 10, 10)
    dy, dx = torch.randint(0, 3, (2, b, 1), generator=generator)
    rows = (dy + torch.arange(8))[:, :, None]                # (B, 8, 1)
    cols = (dx + torch.arange(8))[:, None, :]                # (B, 1, 8)
    shifted = padded[torch.arange(b)[:, None, None], rows, cols][:, None]
    std = torch.rand(b, 1, 1, 1, generator=generator) * noise_std
    noise = torch.randn(shifted.shape, generator=generator) * std
    return (shifted + noise).clamp(-1, 1)


def train_classifier(seed: int = 0, epochs: int = 30, batch_size: int = 64, lr: float = 3e-3,
                     weight_decay: float = 1e-2, noise_std: float = 0.2) -> DigitClassifier:
    """Train a :class:`DigitClassifier` on the train split; returns it in eval mode, on the CPU.

    AdamW with a cosine learning-rate decay to 0 over ``epochs`` epochs of shuffled batches, each
    image augmented by :func:`_augment`. Initialization, shuffling and augmentation all draw from
    ``seed``, so a seed gives the same model on a given machine (float rounding may differ across
    CPUs). The defaults take about 10 s on 2 CPU cores and reach about 99% test accuracy.
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
    images, labels = load_digits("train")
    generator = torch.Generator().manual_seed(seed)
    # initialize from the seed without touching the caller's global RNG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(images.shape[0] / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(images.shape[0], generator=generator).split(batch_size):
            x = _augment(images[batch], noise_std, generator)
            loss = F.cross_entropy(model(x), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


def save_classifier(model: DigitClassifier, path: str | Path = CLASSIFIER_PATH) -> None:
    """Write the classifier's weights to a safetensors file (creating its folder)."""
    if not isinstance(model, DigitClassifier):
        raise TypeError(f"model must be a DigitClassifier, got {type(model).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(model.state_dict(), path)


def load_classifier(device: str | torch.device = "cpu",
                    path: str | Path = CLASSIFIER_PATH) -> DigitClassifier:
    """The classifier stored at ``path`` (default: the shipped one), in eval mode on ``device``."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no classifier at {path}; make one with "
                                f"python -m fastgen_kernels.digits --out {path}")
    model = DigitClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()


def _check_images(name: str, images: Tensor, min_count: int) -> None:
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {images.dtype}")
    if images.dim() != 4 or images.shape[1:] != (1, 8, 8) or images.shape[0] < min_count:
        raise ValueError(f"{name} must have shape (N, 1, 8, 8) with N >= {min_count}, "
                         f"got shape {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contains NaN or infinite values")


@torch.no_grad()
def _features_and_predictions(classifier: DigitClassifier, images: Tensor,
                              batch_size: int) -> tuple[Tensor, Tensor]:
    """Features (N, 128) float32 and predicted labels (N,) int64, on the classifier's device."""
    device = next(classifier.parameters()).device
    features, predictions = [], []
    for x in images.split(batch_size):
        h = classifier.features(x.to(device, torch.float32).clamp(-1, 1))
        features.append(h)
        predictions.append(classifier.head(h).argmax(dim=1))
    return torch.cat(features), torch.cat(predictions)


def evaluate(images: Tensor, labels: Tensor | None = None, classifier: DigitClassifier | None = None,
             reference: Tensor | None = None, batch_size: int = 512) -> dict[str, float]:
    """Score generated digits: {"fd": ..., "accuracy": ...} ("accuracy" only when labels given).

    images: (N, 1, 8, 8), N >= 2, any float dtype and device, clamped to [-1, 1] first (samples
    may overshoot); labels: (N,) integer classes the images were generated for; classifier: default
    :func:`load_classifier` on the images' device; reference: (M, 1, 8, 8) real images, M >= 2,
    default all 1797 digits. fd = frechet_distance(features(images), features(reference));
    accuracy = mean(argmax logits(images) == labels). The classifier runs in batches of
    ``batch_size`` images without autograd, as given (eval mode is the caller's choice).
    """
    _check_images("images", images, min_count=2)
    if labels is not None:
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},) to match images, "
                             f"got shape {tuple(labels.shape)}")
        if not (0 <= labels.min() and labels.max() < NUM_CLASSES):
            raise ValueError(f"labels must be classes in 0..{NUM_CLASSES - 1}, got values in "
                             f"{int(labels.min())}..{int(labels.max())}")
    if classifier is None:
        classifier = load_classifier(images.device)
    elif not isinstance(classifier, DigitClassifier):
        raise TypeError(f"classifier must be a DigitClassifier or None, got {type(classifier).__name__}")
    if reference is None:
        reference = load_digits("all")[0]
    _check_images("reference", reference, min_count=2)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")

    features, predictions = _features_and_predictions(classifier, images, batch_size)
    reference_features, _ = _features_and_predictions(classifier, reference, batch_size)
    result = {"fd": frechet_distance(features, reference_features)}
    if labels is not None:
        correct = predictions == labels.to(predictions.device)
        result["accuracy"] = float(correct.to(torch.float64).mean())
    return result


def main(argv: list[str] | None = None) -> None:
    """Train the classifier and write it: ``python -m fastgen_kernels.digits [--seed S] [--out P]``."""
    parser = argparse.ArgumentParser(prog="python -m fastgen_kernels.digits", description=(
        "Train the digits classifier used by fastgen_kernels.digits.evaluate and write its weights."))
    parser.add_argument("--seed", type=int, default=0, help="seed of the training run (default 0)")
    parser.add_argument("--out", type=Path, default=CLASSIFIER_PATH,
                        help=f"safetensors file to write (default {CLASSIFIER_PATH})")
    args = parser.parse_args(argv)

    model = train_classifier(seed=args.seed)
    save_classifier(model, args.out)
    test_images, test_labels = load_digits("test")
    scores = evaluate(test_images, test_labels, classifier=model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, {n_params} parameters)")
    print(f"test accuracy {scores['accuracy']:.4f}, FD(test, all digits) {scores['fd']:.4f}")


if __name__ == "__main__":
    main()
