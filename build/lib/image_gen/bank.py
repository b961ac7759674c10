"""Sample queues of the image trainer: one FIFO queue of real samples per class plus one global
(unconditional) FIFO queue, as in the authors' release (memory_bank.py).

Every real sample pushed goes to the queue of its class and to the global queue. Positives for a
label are drawn only from that label's queue; unconditional negatives from the global queue.
Samples are stored as tensors [*sample_shape] in `dtype` (e.g. bfloat16 latents to halve memory).
"""

from __future__ import annotations

import torch


class ClassQueues:
    """Per-class FIFO queues of capacity `per_class` and one global FIFO queue of `global_size`.

    Args:
        num_classes: K labels 0..K-1.
        sample_shape: shape of one sample, e.g. (4, 32, 32).
        per_class: capacity of each class queue (release: 128).
        global_size: capacity of the unconditional queue (release: 1000).
        dtype: storage dtype; sampled tensors come back in float32.
    """

    def __init__(
        self,
        num_classes: int,
        sample_shape: tuple[int, ...],
        per_class: int = 128,
        global_size: int = 1000,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        for name, v in (("num_classes", num_classes), ("per_class", per_class),
                        ("global_size", global_size)):
            if v < 1:
                raise ValueError(f"{name}: expected >= 1, got {v}")
        self.num_classes, self.sample_shape = num_classes, tuple(sample_shape)
        self.items = torch.zeros(num_classes, per_class, *self.sample_shape, dtype=dtype)
        self.head = torch.zeros(num_classes, dtype=torch.long)  # next slot to write per class
        self.count = torch.zeros(num_classes, dtype=torch.long)  # filled slots per class
        self.global_items = torch.zeros(global_size, *self.sample_shape, dtype=dtype)
        self.global_head = torch.zeros((), dtype=torch.long)
        self.global_count = torch.zeros((), dtype=torch.long)

    @property
    def per_class(self) -> int:
        return self.items.shape[1]

    def push(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Append real samples x [N, *sample_shape] with labels Long[N]; the oldest entries of a
        full queue are overwritten (FIFO)."""
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"x: expected shape [N, {', '.join(map(str, self.sample_shape))}], "
                             f"got {tuple(x.shape)}")
        labels = labels.long().cpu()
        if labels.shape != (x.shape[0],):
            raise ValueError(f"labels: expected shape ({x.shape[0]},), got {tuple(labels.shape)}")
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels: expected values in [0, {self.num_classes}), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        x = x.detach().to("cpu", self.items.dtype)
        for xi, c in zip(x, labels.tolist()):
            self.items[c, self.head[c]] = xi
            self.head[c] = (self.head[c] + 1) % self.per_class
            self.count[c] = torch.clamp(self.count[c] + 1, max=self.per_class)
            self.global_items[self.global_head] = xi
            self.global_head = (self.global_head + 1) % len(self.global_items)
            self.global_count = torch.clamp(self.global_count + 1, max=len(self.global_items))

    def sample_positive(
        self, labels: torch.Tensor, n: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """n positives per label from that label's queue: [P, n, *sample_shape] float32.
        Without replacement while the queue holds >= n samples, with replacement otherwise."""
        labels = labels.long().cpu()
        empty = [c for c in labels.tolist() if self.count[c] == 0]
        if empty:
            raise ValueError(f"labels: class queues {sorted(set(empty))} are empty; push samples "
                             "of these classes before sampling them")
        idx = torch.stack([_draw(int(self.count[c]), n, generator) for c in labels.tolist()])
        return self.items[labels[:, None], idx].float()

    def sample_unconditional(
        self, shape: tuple[int, ...], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Unconditional samples from the global queue: [*shape, *sample_shape] float32, each row
        of the last entry of `shape` drawn independently (without replacement when possible)."""
        if int(self.global_count) == 0:
            raise ValueError("global queue is empty; push samples before sampling negatives")
        *rows, n = shape
        n_rows = int(torch.tensor(rows).prod()) if rows else 1
        idx = torch.stack([_draw(int(self.global_count), n, generator) for _ in range(n_rows)])
        return self.global_items[idx].float().reshape(*shape, *self.sample_shape)

    def min_count(self) -> int:
        """The fill of the emptiest class queue."""
        return int(self.count.min())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"items": self.items, "head": self.head, "count": self.count,
                "global_items": self.global_items, "global_head": self.global_head,
                "global_count": self.global_count}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key, own in self.state_dict().items():
            if key not in state:
                raise ValueError(f"queue state: missing key {key!r}")
            if tuple(state[key].shape) != tuple(own.shape):
                raise ValueError(f"queue state {key}: expected shape {tuple(own.shape)}, got "
                                 f"{tuple(state[key].shape)}")
        self.items = state["items"].to(self.items.dtype).clone()
        self.global_items = state["global_items"].to(self.items.dtype).clone()
        for key in ("head", "count", "global_head", "global_count"):
            setattr(self, key, state[key].long().clone())


def _draw(available: int, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """n indices into [0, available): a random subset if available >= n, else with replacement."""
    if available >= n:
        return torch.randperm(available, generator=generator)[:n]
    return torch.randint(available, (n,), generator=generator)
