"""The digits demo's data, its shipped classifier and evaluate(); no full training run (about 10 s)."""

import sys

import pytest
import torch

pytest.importorskip("sklearn")

from fastgen_kernels import digits  # noqa: E402
from fastgen_kernels.digits import (  # noqa: E402
    CLASSIFIER_PATH,
    DigitClassifier,
    evaluate,
    load_classifier,
    load_digits,
    save_classifier,
    train_classifier,
)


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


@pytest.fixture(scope="module")
def splits():
    return {split: load_digits(split) for split in ("all", "train", "test")}


def rows(images, labels):
    """The (label, pixels) rows of a split as a sorted list: the split as a multiset."""
    return sorted(map(tuple, torch.cat([labels[:, None].float(), images.flatten(1)], 1).tolist()))


@pytest.mark.parametrize("split, n", [("all", 1797), ("train", 1442), ("test", 355)])
def test_load_digits_shapes_range_and_determinism(split, n):
    images, labels = load_digits(split)
    assert images.shape == (n, 1, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (n,) and labels.dtype == torch.int64
    assert images.min() == -1 and images.max() == 1
    pixels = (images + 1) * 8   # the original 0..16 integers, exactly
    assert torch.equal(pixels, pixels.round())
    assert torch.equal(labels.unique(), torch.arange(10))
    again_images, again_labels = load_digits(split)
    assert torch.equal(images, again_images) and torch.equal(labels, again_labels)


def test_train_and_test_partition_all_stratified(splits):
    (all_x, all_y), (train_x, train_y), (test_x, test_y) = splits["all"], splits["train"], splits["test"]
    assert rows(all_x, all_y) == rows(torch.cat([train_x, test_x]), torch.cat([train_y, test_y]))
    # every 5th image of each class: floor(n_c / 5) test images of class c
    assert torch.equal(test_y.bincount(), all_y.bincount() // 5)


def test_load_digits_bad_split_and_missing_sklearn(monkeypatch):
    with pytest.raises(ValueError, match="split must be one of"):
        load_digits("validation")
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)   # makes the import fail
    with pytest.raises(ImportError, match=r'pip install --no-build-isolation -e "\.\[demo\]"'):
        load_digits()


def test_shipped_classifier(classifier, splits):
    assert CLASSIFIER_PATH.is_file() and CLASSIFIER_PATH.stat().st_size < 1_000_000
    assert isinstance(classifier, DigitClassifier) and not classifier.training
    assert sum(p.numel() for p in classifier.parameters()) < 200_000
    images, labels = splits["test"]
    with torch.no_grad():
        assert classifier.features(images).shape == (images.shape[0], 128)
        accuracy = (classifier(images).argmax(1) == labels).float().mean()
    assert accuracy >= 0.97


def test_evaluate_separates_real_from_noise(classifier, splits):
    (train_x, _), (test_x, test_y) = splits["train"], splits["test"]
    real = evaluate(test_x, test_y, classifier, reference=train_x)
    noise = torch.rand(500, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fake = evaluate(noise, None, classifier, reference=train_x)
    assert set(real) == {"fd", "accuracy"} and set(fake) == {"fd"}
    assert 0 < real["fd"] < fake["fd"] / 10
    assert real["accuracy"] >= 0.97


def test_evaluate_defaults_clamping_and_batching(classifier, splits):
    images, labels = splits["test"]
    base = evaluate(images, labels)   # the shipped classifier, against all 1797 digits
    assert base == evaluate(images, labels, classifier, reference=splits["all"][0])
    # overshooting samples count as their clamped values; batching and dtype change nothing
    overshoot = images * 1.3
    assert evaluate(overshoot, labels, classifier) == evaluate(overshoot.clamp(-1, 1), labels, classifier)
    for other in (evaluate(images, labels, classifier, batch_size=100),
                  evaluate(images.double(), labels.int(), classifier)):
        assert other["accuracy"] == base["accuracy"]
        assert other["fd"] == pytest.approx(base["fd"], rel=1e-5)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(images=[[0.0]]), TypeError, "images must be a torch.Tensor"),
    (dict(images=torch.zeros(4, 1, 8, 8, dtype=torch.int64)), TypeError, "images must be a floating"),
    (dict(images=torch.zeros(4, 8, 8)), ValueError, r"images must have shape \(N, 1, 8, 8\)"),
    (dict(images=torch.zeros(1, 1, 8, 8)), ValueError, "N >= 2"),
    (dict(images=torch.full((4, 1, 8, 8), float("nan"))), ValueError, "images contains NaN"),
    (dict(labels=torch.zeros(4)), TypeError, "labels must be an integer tensor"),
    (dict(labels=torch.zeros(3, dtype=torch.int64)), ValueError, r"labels must have shape \(4,\)"),
    (dict(labels=torch.tensor([0, 1, 2, 10])), ValueError, r"labels must be classes in 0\.\.9"),
    (dict(classifier=torch.nn.Linear(64, 10)), TypeError, "classifier must be a DigitClassifier"),
    (dict(reference=torch.zeros(4, 1, 7, 7)), ValueError, r"reference must have shape"),
    (dict(batch_size=0), ValueError, "batch_size must be a positive int"),
])
def test_evaluate_bad_inputs_raise(classifier, kwargs, error, match):
    args = dict(images=torch.zeros(4, 1, 8, 8), labels=None, classifier=classifier, reference=None)
    with pytest.raises(error, match=match):
        evaluate(**{**args, **kwargs})


def test_train_one_epoch_save_load_and_main(tmp_path, monkeypatch):
    """Training is deterministic for a seed; the weights survive a safetensors round trip; main()
    writes its --out file (with 1 epoch here: the full run is the one that made the shipped file)."""
    model = train_classifier(seed=3, epochs=1)
    assert isinstance(model, DigitClassifier) and not model.training
    path = tmp_path / "sub" / "c.safetensors"
    save_classifier(model, path)
    loaded = load_classifier(path=path)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name

    monkeypatch.setattr(digits, "train_classifier", lambda seed: train_classifier(seed=seed, epochs=1))
    digits.main(["--seed", "3", "--out", str(tmp_path / "main.safetensors")])
    from_main = load_classifier(path=tmp_path / "main.safetensors")
    for (name, a), b in zip(model.state_dict().items(), from_main.state_dict().values()):
        assert torch.equal(a, b), name


def test_training_and_loading_bad_inputs_raise(tmp_path):
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        train_classifier(epochs=0)
    with pytest.raises(ValueError, match="lr must be positive"):
        train_classifier(lr=-1.0)
    with pytest.raises(TypeError, match="model must be a DigitClassifier"):
        save_classifier(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="python -m fastgen_kernels.digits"):
        load_classifier(path=tmp_path / "missing.safetensors")
