"""LeRobot itself on what this project writes: LeRobotDataset opens our v3 directories (videos
included), and the `lerobot_policy_drifting` plugin trains with lerobot-train, checkpoints,
resumes, loads with from_pretrained and acts with one network pass per chunk, on the same
windows and normaliser statistics as `drifting-policy train`.

LeRobot 0.4.4 pins huggingface-hub<0.36, which this project's environment cannot hold, so these
checks run in their own virtualenv (`make venv-lerobot`, created by .ci/run), through
tests/lerobot_checks.py. Without it they skip; with LEROBOT_REQUIRED=1 (CI) they fail instead.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from drifting_policy.config import compose
from drifting_policy.data.convert import convert
from drifting_policy.data.dataset import load_dataset
from drifting_policy.data.replay_buffer import write_replay_atomic

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("LEROBOT_VENV", ROOT / ".venv-lerobot"))
PYTHON = VENV / "bin" / "python"
REQUIRED = os.environ.get("LEROBOT_REQUIRED", "") not in ("", "0")

if not PYTHON.exists() and not REQUIRED:
    pytest.skip(f"LeRobot virtualenv absent ({VENV}): `make venv-lerobot` creates it "
                "(.ci/run does)", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).parent))
from test_lerobot_dataset import pusht_episodes  # noqa: E402


def run_check(*args: str) -> dict:
    if not PYTHON.exists():
        pytest.fail(f"LEROBOT_REQUIRED is set but {PYTHON} does not exist (make venv-lerobot)")
    proc = subprocess.run([str(PYTHON), str(ROOT / "tests" / "lerobot_checks.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lerobot")
    eps = pusht_episodes(3, seed=3)
    write_replay_atomic(root / "pusht.zarr", iter(eps))
    convert(root / "pusht.zarr", root / "pusht", task="push the T")
    convert(root / "pusht.zarr", root / "pusht_lowdim", drop=("img",))
    return {"root": root, "episodes": eps}


def test_lerobot_opens_our_dataset(data):
    got = run_check("open", data["root"] / "pusht")
    eps = data["episodes"]
    assert got["num_frames"] == sum(len(e["action"]) for e in eps) and got["num_episodes"] == 3
    assert got["fps"] == 10 and got["video_keys"] == ["observation.image"]
    assert got["tasks"] == ["push the T"]
    frame = got["frame"]  # frame 5 of episode 0, through LeRobot's parquet reader
    assert frame["episode_index"] == 0
    np.testing.assert_array_equal(frame["action"], eps[0]["action"][5])
    np.testing.assert_array_equal(frame["observation.state"], eps[0]["state"][5, :2])
    np.testing.assert_array_equal(frame["observation.environment_state"],
                                  eps[0]["keypoint"][5].reshape(-1))
    np.testing.assert_allclose(got["stats_action_max"],
                               np.concatenate([e["action"] for e in eps]).max(0))
    if "video_error" in got and not REQUIRED:
        pytest.skip(f"LeRobot cannot decode video here: {got['video_error']} (needs torchcodec "
                    "and FFmpeg's shared libraries; see docs/lerobot.md)")
    assert "video_error" not in got, got["video_error"]
    image = np.asarray(got["video_frame"]["observation.image"])  # [3, H, W] in [0, 1]
    err = np.abs(image.transpose(1, 2, 0) * 255 - eps[0]["img"][5]).mean()
    assert image.shape == (3, 96, 96) and err < 3.0, err


def test_lerobot_train_resume_and_policy(data):
    """lerobot-train trains, checkpoints and resumes; the saved policy loads and acts; windows
    and normaliser statistics are those of `drifting-policy train` on the same directory."""
    lowdim, out = data["root"] / "pusht_lowdim", data["root"] / "run"
    trained = run_check("train", lowdim, out, 6)
    assert trained["checkpoints"] == ["000006", "000016", "last"]
    assert sorted(map(int, trained["losses"])) == list(range(1, 7))
    # continues at step 7
    assert sorted(map(int, trained["resumed_losses"])) == list(range(7, 17))
    assert all(np.isfinite(v) for v in [*trained["losses"].values(),
                                        *trained["resumed_losses"].values()])

    got = run_check("policy", out / "checkpoints" / "last" / "pretrained_model", lowdim)
    assert got["network_calls"] == 2  # 16 steps, Ta = 8: one network pass per chunk
    assert np.asarray(got["actions"]).shape == (16, 1, 2)
    assert got["medoid_calls"] == 1 and np.asarray(got["medoid_action"]).shape == (1, 2)
    # padded action steps are outside the drift problems: garbling them changes nothing
    assert got["padded_steps"] > 0
    assert got["loss_garbled_padding"] == pytest.approx(got["loss"], rel=1e-6)
    assert got["loss_garbled_unmasked"] != pytest.approx(got["loss"], rel=1e-3)

    ours = load_dataset(OmegaConf.to_container(compose("train_policy", [
        "task=pusht_lowdim", f"task.dataset.path={lowdim}", "task.dataset.val_ratio=0"]
    ).task.dataset, resolve=True))
    assert got["windows"] == len(ours)
    stats = ours.get_normalizer()["obs"].input_stats  # obs = [environment_state, state]
    theirs = got["stats"]
    for name in ("min", "max"):
        lerobot = np.concatenate([theirs["observation.environment_state"][name],
                                  theirs["observation.state"][name]])
        np.testing.assert_allclose(stats[name].numpy(), lerobot, rtol=1e-6)
    actions = ours.get_normalizer()["action"].input_stats
    np.testing.assert_allclose(actions["min"].numpy(), theirs["action"]["min"], rtol=1e-6)
    np.testing.assert_allclose(actions["max"].numpy(), theirs["action"]["max"], rtol=1e-6)


def test_lerobot_trains_an_image_policy(data):
    """The camera path of the plugin: lerobot-train decodes our mp4 frames (torchcodec) into
    observation.image, the project's ResNet encoder consumes them; the policy loads and acts."""
    video = data["root"] / "pusht"
    if "video_error" in run_check("open", video) and not REQUIRED:
        pytest.skip("LeRobot cannot decode video here (torchcodec + FFmpeg libraries)")
    out = data["root"] / "run_image"
    trained = run_check("train", video, out, 2)
    assert trained["checkpoints"] == ["000002", "000012", "last"]
    got = run_check("policy", out / "checkpoints" / "last" / "pretrained_model", video)
    assert got["network_calls"] == 2 and np.asarray(got["actions"]).shape == (16, 1, 2)
    assert got["loss_garbled_padding"] == pytest.approx(got["loss"], rel=1e-6)
