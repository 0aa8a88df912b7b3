"""Example data loader: MNIST through torchvision, transforms from the config."""
from typing import Any

import torchvision
from torch.utils.data import Subset
from torchvision import transforms as tv_transforms

from base import BaseDataLoader
from utils.errors import ConfigError

DEFAULT_TRANSFORMS = [{"type": "ToTensor"}, {"type": "Normalize", "args": {"mean": [0.1307], "std": [0.3081]}}]


def build_transforms(spec: list[dict[str, Any]]) -> tv_transforms.Compose:
    """Compose a list of {type, args} from torchvision.transforms (validated by parse_config)."""
    return tv_transforms.Compose([getattr(tv_transforms, item["type"])(**item.get("args", {})) for item in spec])


class MnistDataLoader(BaseDataLoader):
    """MNIST train or test split; `limit` keeps only the first N samples (quick runs and tests)."""

    def __init__(self, data_dir: str, batch_size: int, shuffle: bool = True, validation_split: float | int = 0.0,
                 num_workers: int | str = "auto", training: bool = True, download: bool = False,
                 transforms: list[dict[str, Any]] | None = None, limit: int | None = None,
                 pin_memory: bool | str = "auto"):
        try:
            dataset = torchvision.datasets.MNIST(data_dir, train=training, download=download,
                                                 transform=build_transforms(transforms or DEFAULT_TRANSFORMS))
        except RuntimeError as error:  # torchvision's "Dataset not found"
            raise ConfigError(f"data_loader.args.data_dir: no MNIST under '{data_dir}' ({error}); "
                              "point data_dir at it or set download: true") from None
        if limit is not None:
            dataset = Subset(dataset, range(min(limit, len(dataset))))
        super().__init__(dataset, batch_size, shuffle, validation_split, num_workers, pin_memory=pin_memory)
