"""End to end on real PushT data: train -> checkpoint -> interrupt -> resume -> eval, plus the
checkpoint's failure modes."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from drifting_policy import checkpoint as ckpt
from drifting_policy.config import compose
from drifting_policy.data.replay_buffer import ReplayBuffer
from drifting_policy.eval import evaluate
from drifting_policy.train import TrainWorkspace
from envs.pusht.env import PushTEnv

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def pusht_zarr(tmp_path_factory) -> Path:
    """A small PushT replay buffer in DP's layout (img, state, keypoint, action), from seeded
    random-walk episodes."""
    rng = np.random.default_rng(0)
    env = PushTEnv(obs_type="keypoints")
    buf = ReplayBuffer.empty()
    for ep in range(4):
        obs, _ = env.reset(seed=ep)
        target = env.get_state()[:2].astype(np.float64)
        rows = {"keypoint": [], "state": [], "action": [], "img": []}
        for _ in range(24):
            target = np.clip(target + rng.normal(0, 20, 2), 0, 512)
            rows["img"].append(env.render())
            rows["keypoint"].append(obs[:18].reshape(9, 2))
            rows["state"].append(env.get_state())
            rows["action"].append(target.astype(np.float32))
            obs, *_ = env.step(target)
        buf.add_episode({k: np.asarray(v, dtype=np.float32) for k, v in rows.items()})
    path = tmp_path_factory.mktemp("data") / "pusht.zarr"
    buf.save(path)
    return path


def _cfg(run_dir: Path, data: Path, policy: str = "drifting", **extra):
    overrides = [
        f"policy={policy}", f"run_dir={run_dir}", f"task.dataset.path={data}",
        "task.dataset.val_ratio=0.25", "device=cpu", "logging.mode=disabled",
        "policy.down_dims=[16,32]", "policy.diffusion_step_embed_dim=16",
        "training.batch_size=8", "training.num_steps=6", "training.lr_warmup_steps=2",
        "training.checkpoint_every=2", "training.val_every=3", "training.rollout_every=6",
        "training.rollout.n_test=2", "training.rollout.n_videos=1", "task.runner.n_envs=1",
        "task.env.max_steps=16", "training.log_every=1",
    ]
    return compose("train_policy", overrides + [f"{k}={v}" for k, v in extra.items()])


RAW, DEPLOYABLE = ckpt.RAW, f"{ckpt.PRETRAINED}/model.safetensors"


def _weights(path: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(path / "checkpoints" / "latest" / name))



def test_train_interrupt_resume_is_exact_then_eval(tmp_path, pusht_zarr):
    # uninterrupted reference run
    full = TrainWorkspace(_cfg(tmp_path / "full", pusht_zarr))
    full.run()
    # the same run interrupted after step 3 (last checkpoint at step 2), then resumed
    part = TrainWorkspace(_cfg(tmp_path / "part", pusht_zarr))
    part.run(until_step=3)
    assert ckpt.load_train_state(tmp_path / "part/checkpoints/latest")["step"] == 2
    resumed = TrainWorkspace(_cfg(tmp_path / "part", pusht_zarr, resume="true"))
    assert resumed.step == 2
    resumed.run()
    assert resumed.step == full.step == 6
    for name in (RAW, DEPLOYABLE):
        a, b = _weights(tmp_path / "full", name), _weights(tmp_path / "part", name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{name}:{k}")

    logs = [json.loads(line) for line in (tmp_path / "full/logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    assert any("val/action_mse" in r for r in logs)
    rollout = [r for r in logs if "test/mean_score" in r]
    assert len(rollout) == 1 and 0.0 <= rollout[0]["test/mean_score"] <= 1.0
    # DP's protocol over one rollout: max = mean of the last k = that score, k = 1
    assert rollout[0]["test/max_score"] == rollout[0]["test/mean_last_k"] == rollout[0][
        "test/mean_score"] and rollout[0]["test/k"] == 1
    # the rollout's checkpoint joined the top-k
    topk = [p.name for p in (tmp_path / "full/checkpoints").iterdir() if "score" in p.name]
    assert len(topk) == 1 and topk[0].startswith("step_0000006")

    out = tmp_path / "eval"
    result = evaluate(tmp_path / "full/checkpoints/latest", out, n_test=3, n_envs=1, n_videos=1,
                      progress=False)
    saved = json.loads((out / "eval.json").read_text())
    assert saved["mean_score"] == pytest.approx(np.mean([s["score"] for s in saved["per_seed"]]))
    assert [s["seed"] for s in saved["per_seed"]] == [100000, 100001, 100002]
    assert result["videos"] and Path(result["videos"][0]).stat().st_size > 0


def test_diffusion_baseline_trains_and_checkpoints(tmp_path, pusht_zarr):
    ws = TrainWorkspace(_cfg(tmp_path, pusht_zarr, policy="diffusion",
                             **{"training.rollout_every": 0, "training.num_steps": 2}))
    ws.run()
    policy, cfg = ckpt.load_policy(tmp_path / "checkpoints/latest")
    assert cfg.type == "diffusion" and type(policy).__name__ == "DiffusionPolicy"
    # the deployable part is a plain save_pretrained directory
    from drifting_policy import load_policy

    again, _ = load_policy(tmp_path / "checkpoints/latest/pretrained_model")
    assert all(torch.equal(a, b) for a, b in zip(policy.state_dict().values(),
                                                  again.state_dict().values()))
    obs = {"obs": torch.rand(1, 2, 20) * 512}
    assert policy.predict_action(obs)["action"].shape == (1, 8, 2)


def test_final_weights_are_saved_before_a_failing_final_rollout(tmp_path, pusht_zarr,
                                                                 monkeypatch):
    ws = TrainWorkspace(_cfg(tmp_path, pusht_zarr, **{"training.num_steps": 5}))

    def crash(self):
        raise RuntimeError("simulator crashed")

    monkeypatch.setattr(TrainWorkspace, "_rollout_metrics", crash)
    with pytest.raises(RuntimeError, match="simulator crashed"):
        ws.run()  # step 5 is not a checkpoint step (every 2): only the final save has it
    assert ckpt.load_train_state(tmp_path / "checkpoints/latest")["step"] == 5
    saved = _weights(tmp_path, RAW)
    state = ws.policy.state_dict()
    assert saved.keys() <= state.keys() and all(torch.equal(saved[k], state[k]) for k in saved)


def test_checkpoint_write_is_atomic_and_loading_validates(tmp_path, pusht_zarr, monkeypatch):
    ws = TrainWorkspace(_cfg(tmp_path, pusht_zarr))
    latest = ws.save("latest")
    before = load_file(str(latest / RAW))

    # a crash in the middle of writing leaves the previous checkpoint untouched
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", boom)
    with torch.no_grad():
        next(ws.policy.parameters()).add_(1.0)
    with pytest.raises(RuntimeError, match="disk full"):
        ws.save("latest")
    monkeypatch.undo()
    after = load_file(str(latest / RAW))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not [p for p in latest.parent.iterdir() if p.name.startswith(".")]

    # train state is plain data: loads with weights_only=True
    state = torch.load(latest / ckpt.STATE, weights_only=True)
    assert state["step"] == 0
    # a corrupt weights file and a missing file give clear errors
    (latest / RAW).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="raw_model.safetensors: not a readable safetensors"):
        ckpt.load_policy(latest, ema=False)
    (latest / DEPLOYABLE).unlink()
    with pytest.raises(ValueError, match="missing model.safetensors"):
        ckpt.load_policy(latest)
    (latest / ckpt.PRETRAINED / "config.json").unlink()
    with pytest.raises(ValueError, match="missing config.json"):
        ckpt.load_policy(latest)


def test_image_policy_trains_and_rolls_out(tmp_path, pusht_zarr):
    ws = TrainWorkspace(_cfg(tmp_path, pusht_zarr, task="pusht_image", **{
        "training.num_steps": 2, "training.batch_size": 4, "training.rollout_every": 2,
        "training.rollout.n_test": 1, "task.env.max_steps": 8}))
    batch = ws.dataset[0]
    seen = batch["obs"]["image"]  # first_k: only the To conditioning frames, as bytes
    assert seen.shape == (2, 3, 96, 96) and seen.dtype == torch.uint8
    assert seen.float().std() > 0.05 * 255
    metrics = ws.run()
    assert 0.0 <= metrics["test/mean_score"] <= 1.0
    policy, _ = ckpt.load_policy(tmp_path / "checkpoints/latest")
    assert policy.obs_encoder.rgb_keys == ["image"]


@pytest.mark.timeout(300)
def test_torchrun_ddp_two_processes(tmp_path, pusht_zarr):
    """DistributedDataParallel on CPU (gloo): both ranks train in lock step, rank 0 saves."""
    import subprocess
    import sys

    overrides = [
        "policy=drifting", f"run_dir={tmp_path}", f"task.dataset.path={pusht_zarr}",
        "device=cpu", "logging.mode=disabled", "policy.down_dims=[16,32]",
        "policy.diffusion_step_embed_dim=16", "training.batch_size=4", "training.num_steps=3",
        "training.rollout_every=0", "training.checkpoint_every=0", "training.val_every=0",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29517", "-m", "drifting_policy.cli", "train", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = ckpt.load_train_state(tmp_path / "checkpoints/latest")
    assert state["step"] == 3
    # each rank consumed its own half of every epoch's shuffled order
    assert state["batches"]["consumed"] == 3


def test_train_help_lists_every_selectable_config(tmp_path, capsys):
    from drifting_policy.cli import main as cli

    assert cli(["train", "--help", f"run_dir={tmp_path / 'never'}"]) == 0
    text = capsys.readouterr().out
    configs = Path(__file__).resolve().parents[1] / "configs"
    for group in ("task", "policy", "size"):
        line = next(row for row in text.splitlines() if row.strip().startswith(group + " "))
        names = {p.stem for p in (configs / group).glob("*.yaml") if not p.stem.startswith("_")}
        assert set(line.split(None, 1)[1].split(" | ")) == names
    assert "_base" not in text and not (tmp_path / "never").exists()  # nothing trained
