"""Example data loader: MNIST through torchvision, transforms from the config."""

from typing import Any

import torchvision
from torch.utils.data import DataLoader, Dataset, Subset

from base import BaseDataLoader
from parse_config.blame import download_failure
from parse_config.loaders import compose_transforms
from utils.errors import ConfigError

DEFAULT_TRANSFORMS = [
    {"type": "ToTensor"},
    {"type": "Normalize", "args": {"mean": [0.1307], "std": [0.3081]}},
]


class MnistDataLoader(BaseDataLoader):
    """MNIST train or test split; `limit` keeps only the first N samples (quick runs and tests). The
    validation split uses the default (deterministic) transforms, so random augmentation only touches
    training."""

    def __init__(
        self,
        data_dir: str,
        batch_size: int,
        shuffle: bool = True,
        validation_split: float | int = 0.0,
        num_workers: int | str = "auto",
        training: bool = True,
        download: bool = False,
        transforms: list[dict[str, Any]] | None = None,
        limit: int | None = None,
        pin_memory: bool | str = "auto",
    ):
        self.data_dir, self.training, self.limit = data_dir, training, limit
        dataset = self._mnist(transforms or DEFAULT_TRANSFORMS, download)
        super().__init__(dataset, batch_size, shuffle, validation_split, num_workers, pin_memory=pin_memory)

    def _mnist(self, transforms: list[dict[str, Any]], download: bool = False) -> Dataset:
        try:
            dataset = torchvision.datasets.MNIST(
                self.data_dir,
                train=self.training,
                download=download,
                transform=compose_transforms(transforms),
            )
        except RuntimeError as error:  # torchvision's "Dataset not found", or a download that failed
            offline = download_failure(error)
            if offline is not None:
                raise ConfigError(
                    f"data_loader.args.download: MNIST could not be downloaded into '{self.data_dir}' "
                    f"({offline}): without network access, copy its files there, or train on the bundled "
                    "digits (configs/mnist.yaml)"
                ) from None
            raise ConfigError(
                f"data_loader.args.data_dir: no MNIST under '{self.data_dir}'; point data_dir at it or set "
                "download: true"
            ) from None
        return dataset if self.limit is None else Subset(dataset, range(min(self.limit, len(dataset))))

    def split_validation(self, dataset: Dataset | None = None) -> DataLoader | None:
        return super().split_validation(dataset or self._mnist(DEFAULT_TRANSFORMS))
