"""atomic_path: the one crash-safe write every writer uses; rng_state round trip."""

import random

import numpy as np
import pytest
import torch

from drifting_policy.persist import atomic_path, rng_state, set_rng_state


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_files_and_directories_replace_the_destination_only_when_complete(tmp_path):
    dst = tmp_path / "out.bin"
    with atomic_path(dst) as tmp:
        tmp.write_bytes(b"one")
        assert not dst.exists()  # nothing visible before the block ends
    assert dst.read_bytes() == b"one"
    with pytest.raises(RuntimeError, match="killed"), atomic_path(dst) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert dst.read_bytes() == b"one" and _siblings(dst) == ["out.bin"]

    folder = tmp_path / "ckpt"
    for version in ("a", "b"):  # an existing directory is swapped out, then deleted
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            (tmp / "weights").write_text(version)
        assert (folder / "weights").read_text() == version
    assert _siblings(folder) == ["ckpt", "out.bin"]
    with atomic_path(dst) as tmp:  # a directory may replace a file
        tmp.mkdir()
        (tmp / "x").write_text("dir")
    assert (dst / "x").read_text() == "dir" and _siblings(dst) == ["ckpt", "out.bin"]
    with pytest.raises(FileNotFoundError, match="nothing was written"), atomic_path(tmp_path / "n"):
        pass
    assert not (tmp_path / "n").exists()


def test_rng_state_round_trip_restores_every_generator():
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1))
    set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(1))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])
    # the state is plain data: it survives torch.save / load(weights_only=True)
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    set_rng_state(torch.load(buf, weights_only=True))
    assert random.random() == first[0]
