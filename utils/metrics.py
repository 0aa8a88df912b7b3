"""Running means of losses and metrics, kept on the device so that training never waits on the host."""
import torch


class MetricTracker:
    """Sums stay tensors on the device; `result()` is the single host sync per read."""

    def __init__(self, *keys: str):
        self.keys = list(keys)
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, torch.Tensor | None] = dict.fromkeys(self.keys)
        self._counts = dict.fromkeys(self.keys, 0)

    def update(self, key: str, value: torch.Tensor, n: int = 1) -> None:
        weighted = value.detach().float() * n
        total = self._sums[key]
        self._sums[key] = weighted if total is None else total + weighted
        self._counts[key] += n

    def result(self) -> dict[str, float]:
        seen = [key for key in self.keys if self._counts[key]]
        if not seen:
            return {}
        means = torch.stack([self._sums[key] / self._counts[key] for key in seen]).tolist()
        return dict(zip(seen, means))

    def state_dict(self) -> dict:
        sums = {key: total.cpu() for key, total in self._sums.items() if total is not None}
        return {"sums": sums, "counts": dict(self._counts)}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.reset()
        for key, total in state["sums"].items():
            self._sums[key] = total.to(device)
        self._counts.update(state["counts"])
