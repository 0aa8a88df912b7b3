"""BaseModel and weight initialisation schemes."""

from functools import partial

from torch import nn

INIT_SCHEMES = {
    "kaiming_uniform": partial(nn.init.kaiming_uniform_, nonlinearity="relu"),
    "kaiming_normal": partial(nn.init.kaiming_normal_, nonlinearity="relu"),
    "xavier_uniform": nn.init.xavier_uniform_,
    "xavier_normal": nn.init.xavier_normal_,
    "orthogonal": nn.init.orthogonal_,
}
_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)


class BaseModel(nn.Module):
    """A module whose printout ends with its trainable parameter count."""

    def __str__(self) -> str:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return f"{super().__str__()}\nTrainable parameters: {trainable}"


def init_weights(model: nn.Module, scheme: str) -> None:
    """Conv/Linear weights by `scheme` with zero bias; norm layers to weight 1, bias 0."""
    initialise = INIT_SCHEMES[scheme]
    for module in model.modules():
        if isinstance(module, _WEIGHTED):
            initialise(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, _NORMS) and getattr(module, "weight", None) is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
