"""Fixed-length windows over a replay buffer, padded at episode edges (Diffusion Policy's rules).

A window of ``sequence_length`` steps may start up to ``pad_before`` steps before an episode and
end up to ``pad_after`` steps after it; the missing steps repeat the episode's first / last frame.
With To observation steps and Ta action steps, Diffusion Policy uses ``pad_before = To - 1`` and
``pad_after = Ta - 1``.

Worked example: one episode of length 3 (frames a b c), ``sequence_length=4``, ``pad_before=1``,
``pad_after=1`` gives the two windows ``a a b c`` and ``a b c c``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

from drifting_policy.data.replay_buffer import ReplayBuffer


def create_indices(
    episode_ends: np.ndarray,
    sequence_length: int,
    pad_before: int = 0,
    pad_after: int = 0,
    episode_mask: np.ndarray | None = None,
) -> np.ndarray:
    """All windows of the selected episodes.

    episode_ends: [E] cumulative end indices; episode_mask: [E] bool (default: all episodes).
    pad_before / pad_after are clipped to [0, sequence_length - 1].
    Returns [n, 4] int64 rows ``(buffer_start, buffer_end, sample_start, sample_end)``: buffer
    steps ``[buffer_start, buffer_end)`` fill window slots ``[sample_start, sample_end)``.
    """
    episode_ends = np.asarray(episode_ends, dtype=np.int64)
    if episode_mask is None:
        episode_mask = np.ones(episode_ends.shape, dtype=bool)
    episode_mask = np.asarray(episode_mask, dtype=bool)
    if episode_mask.shape != episode_ends.shape:
        raise ValueError(
            f"episode_mask shape {episode_mask.shape} != episode_ends shape {episode_ends.shape}"
        )
    if sequence_length < 1:
        raise ValueError(f"sequence_length must be >= 1, got {sequence_length}")
    pad_before = min(max(pad_before, 0), sequence_length - 1)
    pad_after = min(max(pad_after, 0), sequence_length - 1)

    rows = [np.zeros((0, 4), dtype=np.int64)]
    starts = np.concatenate([[0], episode_ends[:-1]])
    for start, end, keep in zip(starts, episode_ends, episode_mask, strict=True):
        if not keep:
            continue
        length = end - start
        # window start relative to the episode, from -pad_before to the last one that still
        # overlaps the episode with at most pad_after padded steps at the end
        offset = np.arange(-pad_before, length - sequence_length + pad_after + 1)
        buffer_start = np.maximum(offset, 0)
        buffer_end = np.minimum(offset + sequence_length, length)
        sample_start = buffer_start - offset
        sample_end = buffer_end - offset
        rows.append(
            np.stack([buffer_start + start, buffer_end + start, sample_start, sample_end], axis=1)
        )
    return np.concatenate(rows).astype(np.int64)


def get_val_mask(n_episodes: int, val_ratio: float, seed: int = 0) -> np.ndarray:
    """[n_episodes] bool, True for validation episodes.

    ``round(n_episodes * val_ratio)`` episodes, at least 1 and leaving at least 1 for training;
    none when ``val_ratio <= 0``. Same draw as Diffusion Policy for the same seed.
    """
    val_mask = np.zeros(n_episodes, dtype=bool)
    if val_ratio <= 0:
        return val_mask
    n_val = min(max(1, round(n_episodes * val_ratio)), n_episodes - 1)
    rng = np.random.default_rng(seed=seed)
    val_mask[rng.choice(n_episodes, size=n_val, replace=False)] = True
    return val_mask


def downsample_mask(mask: np.ndarray, max_n: int | None, seed: int = 0) -> np.ndarray:
    """Keep a seeded random ``max_n`` of the True entries of ``mask`` [E] (all if max_n is None
    or there are fewer)."""
    mask = np.asarray(mask, dtype=bool)
    if max_n is None or mask.sum() <= max_n:
        return mask
    chosen = np.flatnonzero(mask)
    rng = np.random.default_rng(seed=seed)
    chosen = chosen[rng.choice(len(chosen), size=int(max_n), replace=False)]
    result = np.zeros_like(mask)
    result[chosen] = True
    return result


class SequenceSampler:
    """Windows ``{key: [sequence_length, ...]}`` from a replay buffer.

    keys: buffer keys to return (default: all).
    key_first_k: ``{key: k}`` reads only the first k buffer steps of each window for that key
        (Diffusion Policy's shortcut for images, where only the first To frames are used). As in
        Diffusion Policy the unread steps hold NaN (0 for integer dtypes), and padding after the
        episode copies the last *read* slot, so it is NaN too whenever k < the steps available.
    episode_mask: [n_episodes] bool, episodes to draw windows from (default: all).
    """

    def __init__(
        self,
        replay_buffer: ReplayBuffer,
        sequence_length: int,
        pad_before: int = 0,
        pad_after: int = 0,
        keys: Sequence[str] | None = None,
        key_first_k: dict[str, int] | None = None,
        episode_mask: np.ndarray | None = None,
    ) -> None:
        keys = list(replay_buffer.keys()) if keys is None else list(keys)
        key_first_k = dict(key_first_k or {})
        for key in keys + list(key_first_k):
            if key not in replay_buffer:
                raise KeyError(f"key '{key}' not in replay buffer; keys: {replay_buffer.keys()}")
        self.replay_buffer = replay_buffer
        self.sequence_length = sequence_length
        self.keys = keys
        self.key_first_k = key_first_k
        self.indices = create_indices(
            replay_buffer.episode_ends, sequence_length, pad_before, pad_after, episode_mask
        )

    def __len__(self) -> int:
        return len(self.indices)

    def sample_sequence(self, idx: int) -> dict[str, np.ndarray]:
        """Window ``idx``: ``{key: [sequence_length, ...]}`` in the buffer's dtypes. Unpadded
        windows may be views of the buffer: copy before modifying in place."""
        buffer_start, buffer_end, sample_start, sample_end = (int(v) for v in self.indices[idx])
        result = {}
        for key in self.keys:
            array = self.replay_buffer[key]
            if key in self.key_first_k:
                k = min(self.key_first_k[key], buffer_end - buffer_start)
                fill = np.nan if np.issubdtype(array.dtype, np.floating) else 0
                sample = np.full((buffer_end - buffer_start,) + array.shape[1:], fill, array.dtype)
                sample[:k] = array[buffer_start : buffer_start + k]
            else:
                sample = array[buffer_start:buffer_end]
            if sample_start > 0 or sample_end < self.sequence_length:
                window = np.empty((self.sequence_length,) + array.shape[1:], dtype=array.dtype)
                window[:sample_start] = sample[0]
                window[sample_end:] = sample[-1]
                window[sample_start:sample_end] = sample
                sample = window
            result[key] = sample
        return result


class EpochBatchSampler(torch.utils.data.Sampler):
    """Endless seeded batch order for a DataLoader's ``batch_sampler``, resumable exactly.

    Epoch e shuffles ``range(n)`` with ``torch.randperm`` seeded ``seed + e``; the ``world`` ranks
    take strided shards of that one permutation (the ``n % world`` tail is dropped so every rank
    gets as many batches), and each shard is cut into full batches of ``batch_size`` (the rest is
    dropped; at least one batch per epoch).

    The position is ``(epoch, consumed)``. Iterating starts at the position current when
    ``iter()`` is called and never ends, so one DataLoader (with persistent workers) serves the
    whole run; the consumer calls :meth:`advance` for each batch it has *used* — workers fetch
    ahead of it, so the iterator's own progress is not the position. ``state_dict()`` records the
    position and the world size; loading it with another world size raises.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if n < world:
            raise ValueError(f"dataset: expected at least {world} samples (one per rank), got {n}")
        if not 0 <= rank < world:
            raise ValueError(f"rank: expected 0..{world - 1}, got {rank}")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.n_batches = max(1, (n - n % world) // world // batch_size)  # per epoch
        self.epoch, self.consumed = 0, 0

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch`, in order: [n_batches][batch_size] sample indices."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        usable = self.n - self.n % self.world
        order = torch.randperm(self.n, generator=g)[:usable][self.rank :: self.world].tolist()
        return [order[i * self.batch_size : (i + 1) * self.batch_size]
                for i in range(self.n_batches)]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, skip = self.epoch, self.consumed
        while True:
            yield from self.epoch_batches(epoch)[skip:]
            epoch, skip = epoch + 1, 0

    def advance(self) -> None:
        """One more batch used: step the position (into the next epoch after the last)."""
        self.consumed += 1
        if self.consumed == self.n_batches:
            self.epoch, self.consumed = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "world": self.world}

    def load_state_dict(self, state: Mapping) -> None:
        world = int(state.get("world", self.world))
        if world != self.world:
            raise ValueError(f"batches: the checkpoint was written by {world} ranks, this run has "
                             f"{self.world}; resume with the same number of processes")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
