"""Sample queues of the image trainer: one FIFO queue of real samples per class plus one global
(unconditional) FIFO queue, as in the authors' release (memory_bank.py).

Every real sample pushed goes to the queue of its class and to the global queue. Positives for a
label are drawn only from that label's queue; unconditional negatives from the global queue.

The queues are ring buffers held on one device (normally the training GPU) in the storage dtype
(e.g. bfloat16 latents: half the memory), and every operation is a fixed number of tensor ops on
that device: `push` writes a whole batch with one scatter per buffer, the samplers gather with
indices drawn on the device, and nothing is copied to the host or upcast. Value checks (labels in
range, no empty class queue) read tensors on the host, so they run only with `validate=True`;
the trainer validates on its first step and on logging steps.
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
        dtype: storage dtype; sampled tensors come back in it.
        device: where the buffers live (and where sampled tensors are returned).

    State (all on `device`): items [K, per_class, *sample_shape], head / count Long[K] (next slot
    to write / filled slots per class), global_items [global_size, *sample_shape], global_head /
    global_count Long[] (0-d).
    """

    def __init__(
        self,
        num_classes: int,
        sample_shape: tuple[int, ...],
        per_class: int = 128,
        global_size: int = 1000,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        for name, v in (("num_classes", num_classes), ("per_class", per_class),
                        ("global_size", global_size)):
            if v < 1:
                raise ValueError(f"{name}: expected >= 1, got {v}")
        self.num_classes, self.sample_shape = num_classes, tuple(sample_shape)
        kw = {"device": torch.device(device)}
        self.items = torch.zeros(num_classes, per_class, *self.sample_shape, dtype=dtype, **kw)
        self.head = torch.zeros(num_classes, dtype=torch.long, **kw)
        self.count = torch.zeros(num_classes, dtype=torch.long, **kw)
        self.global_items = torch.zeros(global_size, *self.sample_shape, dtype=dtype, **kw)
        self.global_head = torch.zeros((), dtype=torch.long, **kw)
        self.global_count = torch.zeros((), dtype=torch.long, **kw)

    @property
    def per_class(self) -> int:
        return self.items.shape[1]

    @property
    def global_size(self) -> int:
        return self.global_items.shape[0]

    @property
    def device(self) -> torch.device:
        return self.items.device

    def push(self, x: torch.Tensor, labels: torch.Tensor, validate: bool = True) -> None:
        """Append real samples x [N, *sample_shape] with labels Long[N] (any device; copied to
        the queues' device and dtype). Within each queue the batch is appended in order and the
        oldest entries of a full queue are overwritten (FIFO), exactly as N single pushes."""
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"x: expected shape [N, {', '.join(map(str, self.sample_shape))}], "
                             f"got {tuple(x.shape)}")
        if labels.shape != (x.shape[0],):
            raise ValueError(f"labels: expected shape ({x.shape[0]},), got {tuple(labels.shape)}")
        n = x.shape[0]
        if n == 0:
            return
        # copy first, convert on the device: an asynchronous copy from pinned host memory
        labels = labels.to(self.device, non_blocking=True).long()
        x = x.detach().to(self.device, non_blocking=True).to(self.items.dtype)
        if validate:
            self._check_labels(labels)
        k = self.per_class
        # Occurrence o of each sample among this batch's samples of its class (0 = first).
        n_c = torch.zeros_like(self.count).index_add_(0, labels, torch.ones_like(labels))
        order = torch.argsort(labels, stable=True)
        first = torch.cumsum(n_c, 0) - n_c  # where each class starts in `order`
        occ = torch.empty_like(labels)
        occ[order] = torch.arange(n, device=self.device) - first[labels[order]]
        # Writes that land on the same slot (a class with more than `per_class` new samples) all
        # write the value of the last of them, so the scatter's result does not depend on the
        # order the device applies duplicate writes in.
        c_last = occ + k * torch.div(n_c[labels] - 1 - occ, k, rounding_mode="floor")
        winner = order[first[labels] + c_last]
        self.items[labels, (self.head[labels] + occ) % k] = x[winner]
        self.head.add_(n_c).remainder_(k)
        self.count.add_(n_c).clamp_(max=k)

        g = self.global_size
        j = torch.arange(n, device=self.device)
        g_last = j + g * torch.div(n - 1 - j, g, rounding_mode="floor")
        self.global_items[(self.global_head + j) % g] = x[g_last]
        self.global_head.add_(n).remainder_(g)
        self.global_count.add_(n).clamp_(max=g)

    def sample_positive(
        self, labels: torch.Tensor, n: int, generator: torch.Generator | None = None,
        validate: bool = True,
    ) -> torch.Tensor:
        """n positives per label from that label's queue: [P, n, *sample_shape] in the storage
        dtype. A uniformly random subset (in random order) while the queue holds >= n samples,
        drawn with replacement otherwise. labels Long[P] on the queues' device; `generator` (or
        the default one) must live there too."""
        labels = labels.long()
        if validate:
            self._check_labels(labels)
            empty = (self.count[labels] == 0).nonzero().flatten()
            if len(empty):
                classes = sorted(set(labels[empty].tolist()))
                raise ValueError(f"labels: class queues {classes} are empty; push samples of "
                                 "these classes before sampling them")
        idx = _draw(self.count[labels], self.per_class, n, generator)
        return self.items[labels[:, None], idx]

    def sample_unconditional(
        self, shape: tuple[int, ...], generator: torch.Generator | None = None,
        validate: bool = True,
    ) -> torch.Tensor:
        """Unconditional samples from the global queue: [*shape, *sample_shape] in the storage
        dtype, each row of the last entry of `shape` drawn independently (a random subset when
        the queue holds enough, with replacement otherwise)."""
        if validate and int(self.global_count) == 0:
            raise ValueError("global queue is empty; push samples before sampling negatives")
        *rows, n = shape
        n_rows = 1
        for r in rows:
            n_rows *= r
        idx = _draw(self.global_count.expand(n_rows), self.global_size, n, generator)
        return self.global_items[idx].reshape(*shape, *self.sample_shape)

    def min_count(self) -> int:
        """The fill of the emptiest class queue (reads the device: not for the hot path)."""
        return int(self.count.min())

    def _check_labels(self, labels: torch.Tensor) -> None:
        if len(labels) == 0:
            return
        lo, hi = torch.stack([labels.min(), labels.max()]).tolist()
        if lo < 0 or hi >= self.num_classes:
            raise ValueError(f"labels: expected values in [0, {self.num_classes}), got "
                             f"[{lo}, {hi}]")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"items": self.items, "head": self.head, "count": self.count,
                "global_items": self.global_items, "global_head": self.global_head,
                "global_count": self.global_count}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a state (any device; e.g. loaded on the CPU) into the buffers in place."""
        own = self.state_dict()
        for key, buf in own.items():
            if key not in state:
                raise ValueError(f"queue state: missing key {key!r}")
            if tuple(state[key].shape) != tuple(buf.shape):
                raise ValueError(f"queue state {key}: expected shape {tuple(buf.shape)}, got "
                                 f"{tuple(state[key].shape)}")
        for key, buf in own.items():
            buf.copy_(state[key])


def _draw(available: torch.Tensor, capacity: int, n: int,
          generator: torch.Generator | None) -> torch.Tensor:
    """n slot indices per row Long[R, n] into the first available[r] slots of a buffer of
    `capacity` (available Long[R] on the buffer's device, each >= 1): a uniformly random subset
    in random order where available >= n (the n smallest of uniform keys over the filled slots),
    uniform with replacement otherwise."""
    r, dev = available.shape[0], available.device
    repl = (torch.rand(r, n, device=dev, generator=generator) * available[:, None]).long()
    repl = torch.minimum(repl, available[:, None] - 1)  # rand < 1 can round up to 1 in float32
    if n > capacity:  # never enough samples for a subset
        return repl
    keys = torch.rand(r, capacity, device=dev, generator=generator)
    keys = keys.masked_fill(torch.arange(capacity, device=dev) >= available[:, None], 2.0)
    subset = keys.topk(n, dim=1, largest=False).indices
    return torch.where((available >= n)[:, None], subset, repl)
