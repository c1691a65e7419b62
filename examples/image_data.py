"""Image datasets for `run_image_classification.py`: scikit-learn's digits offline, a hub dataset or an image
folder online / locally. Every dataset yields ``{"pixel_values": (C, H, W) float tensor, "labels": int}``.

The digits are the 1,797 real handwritten 8x8 images bundled with scikit-learn (`load_digits`, 16 grey
levels): split once, stratified, with a fixed seed; upsampled bilinearly to `image_size` and replicated
to 3 channels, so the ImageNet-shaped ResNet / MobileNetV2 configs apply unchanged (as for an RGB hub
dataset); standardised with the training split's mean and standard deviation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

DIGITS = "digits"
IMAGE_MEAN, IMAGE_STD = 0.5, 0.5  # hub / folder images: [0, 1] -> [-1, 1]


class TensorImageDataset(Dataset):
    """`pixel_values` `(N, C, H, W)` float and `labels` `(N,)` long, item by item as the Trainer wants them."""

    def __init__(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> None:
        if pixel_values.shape[0] != labels.shape[0]:
            raise ValueError(f"{pixel_values.shape[0]} images but {labels.shape[0]} labels.")
        self.pixel_values, self.labels = pixel_values, labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}

    def subset(self, limit: int | None, seed: int = 0) -> TensorImageDataset:
        """`limit` items drawn at random (stratification is not needed: the draw is per seed), or self."""
        if limit is None or limit >= len(self):
            return self
        keep = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:limit]
        return TensorImageDataset(self.pixel_values[keep], self.labels[keep])


@dataclass
class ImageData:
    train: Dataset
    eval: Dataset
    label_names: list[str]
    num_channels: int


def load_digits_data(image_size: int = 32, test_size: float = 0.3, split_seed: int = 0) -> ImageData:
    """scikit-learn's digits: 1,797 images, a stratified `test_size` split with `split_seed` (0.3: 1,257 / 540)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (N, 8, 8), 16 grey levels
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_size, stratify=digits.target, random_state=split_seed
    )
    images = F.interpolate(images.unsqueeze(1), size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = images.expand(-1, 3, -1, -1)
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = ((images - mean) / std).contiguous()
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    return ImageData(
        TensorImageDataset(images[train_idx], labels[train_idx]),
        TensorImageDataset(images[test_idx], labels[test_idx]),
        [str(d) for d in digits.target_names],
        3,
    )


def _image_and_label_columns(features) -> tuple[str, str]:
    from datasets import ClassLabel, Image

    image = next((name for name, f in features.items() if isinstance(f, Image)), None)
    label = next((name for name, f in features.items() if isinstance(f, ClassLabel)), None)
    if image is None or label is None:
        raise ValueError(
            f"the dataset needs an Image column and a ClassLabel column; its features are {dict(features)}."
        )
    return image, label


def load_hub_or_folder_data(
    dataset_name: str | None,
    dataset_config_name: str | None,
    train_dir: str | None,
    validation_dir: str | None,
    image_size: int,
    validation_split: float = 0.15,
    split_seed: int = 0,
    cache_dir: str | None = None,
) -> ImageData:
    """A hub dataset (e.g. ``cifar10``) or an `imagefolder` (`train_dir` / `validation_dir`, one folder per
    class), resized to `image_size`, scaled to [-1, 1], RGB. Without an eval split, `validation_split` of the
    training split is held out (seed `split_seed`)."""
    import datasets

    if dataset_name is not None:
        raw = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
    else:
        files = {"train": f"{train_dir}/**"}
        if validation_dir is not None:
            files["validation"] = f"{validation_dir}/**"
        raw = datasets.load_dataset("imagefolder", data_files=files, cache_dir=cache_dir)
    eval_split = next((s for s in ("validation", "test") if s in raw), None)
    if eval_split is None:
        held = raw["train"].train_test_split(test_size=validation_split, seed=split_seed, stratify_by_column=None)
        raw, eval_split = datasets.DatasetDict(train=held["train"], validation=held["test"]), "validation"
    image_column, label_column = _image_and_label_columns(raw["train"].features)

    def transform(batch):
        pixels = []
        for image in batch[image_column]:
            array = np.asarray(image.convert("RGB").resize((image_size, image_size)), dtype=np.float32) / 255.0
            pixels.append((torch.from_numpy(array).permute(2, 0, 1) - IMAGE_MEAN) / IMAGE_STD)
        return {"pixel_values": pixels, "labels": batch[label_column]}

    return ImageData(
        raw["train"].with_transform(transform),
        raw[eval_split].with_transform(transform),
        list(raw["train"].features[label_column].names),
        3,
    )
