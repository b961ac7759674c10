"""Typed policy configs, the registry, save_pretrained / from_pretrained, and checkpoints that
try to run code: refused with one clear error, nothing written."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from drifting_policy import checkpoint as ckpt
from drifting_policy import cli, load_policy
from drifting_policy.config import compose
from drifting_policy.nn.normalizer import LinearNormalizer
from drifting_policy.policy import (
    POLICIES,
    ConfigError,
    DiffusionConfig,
    DriftingConfig,
    config_from_dict,
    make_policy,
)

pytestmark = pytest.mark.usefixtures("single_thread")

LOWDIM = {"obs": {"obs": {"shape": [20], "type": "low_dim"}}, "action": {"shape": [2]}}
IMAGE = {"obs": {"image": {"shape": [3, 40, 40], "type": "rgb"},
                 "agent_pos": {"shape": [2], "type": "low_dim"}}, "action": {"shape": [2]}}
SMALL = dict(horizon=8, n_obs_steps=2, n_action_steps=4, down_dims=(16, 32),
             diffusion_step_embed_dim=16)


def _fitted(policy):
    norm = LinearNormalizer()
    for key, m in policy.shape_meta["obs"].items():
        if m["type"] == "rgb":
            norm.set_image(key)
        else:
            norm.fit({key: torch.rand(50, m["shape"][0]) * 5})
    norm.fit({"action": torch.rand(50, 2) * 4 - 2})
    policy.set_normalizer(norm)
    return policy


# ---------------------------------------------------------------------------------- configs
def test_config_fields_are_validated_with_the_field_expected_and_actual():
    cases = [
        (dict(horizon="16"), r"DriftingConfig.horizon: expected int, got '16' \(str\)"),
        (dict(horizon=True), r"DriftingConfig.horizon: expected int, got True \(bool\)"),
        (dict(down_dims=[16, "x"]), r"down_dims: expected a list of int, got \[16, 'x'\]"),
        (dict(gen_per_obs=0), r"DriftingConfig.gen_per_obs: expected >= 1, got 0"),
        (dict(n_action_steps=8), r"n_action_steps: expected 1..horizon - n_obs_steps \+ 1 = 7"),
        (dict(normalize="local"), r"normalize: expected one of 'per_group', 'global'"),
        (dict(crop_shape=[84]), r"crop_shape: expected a list of 2 \(int, int\) or null"),
        (dict(temperatures=[]), r"temperatures: expected at least one positive temperature"),
    ]
    for override, match in cases:
        with pytest.raises(ConfigError, match=match):
            DriftingConfig(shape_meta=LOWDIM, **{**SMALL, **override})
    with pytest.raises(ConfigError, match=r"shape_meta.obs.image.shape: expected 3 positive"):
        DriftingConfig(shape_meta={"obs": {"image": {"shape": [32, 32], "type": "rgb"}},
                                   "action": {"shape": [2]}})
    with pytest.raises(ConfigError, match=r"num_inference_steps: expected 1..num_train_timesteps"):
        DiffusionConfig(shape_meta=LOWDIM, num_inference_steps=101)


def test_config_dict_round_trip_and_registry():
    cfg = DriftingConfig(shape_meta=IMAGE, crop_shape=[36, 36], temperatures=[0.05, 0.2], **SMALL)
    assert cfg.crop_shape == (36, 36) and cfg.temperatures == (0.05, 0.2)
    d = cfg.to_dict()
    assert d["type"] == "drifting" and d["down_dims"] == [16, 32]
    assert json.loads(json.dumps(d)) == d
    assert config_from_dict(d) == cfg
    assert type(make_policy(cfg)) is POLICIES["drifting"]
    assert type(make_policy(DiffusionConfig(shape_meta=LOWDIM, **SMALL))) is POLICIES["diffusion"]
    for bad, match in [({**d, "type": "os.system"}, r"'type': expected one of \['diffusion', "
                        r"'drifting'\], got 'os.system'"),
                       ({**d, "_target_": "pathlib.Path"}, r"unknown field\(s\) \['_target_'\]"),
                       ({"type": "drifting"}, r"missing required field\(s\) \['shape_meta'\]")]:
        with pytest.raises(ConfigError, match=match):
            config_from_dict(bad)


def test_hydra_policy_configs_convert_to_typed_configs():
    """Every task x policy the training configs compose becomes a valid typed config."""
    from omegaconf import OmegaConf

    for task in ("pusht_lowdim", "pusht_image", "lift_image", "blockpush_lowdim"):
        for policy, cls in (("drifting", DriftingConfig), ("diffusion", DiffusionConfig)):
            cfg = compose("train_policy", [f"task={task}", f"policy={policy}"])
            typed = config_from_dict(OmegaConf.to_container(cfg.policy, resolve=True))
            assert type(typed) is cls and typed.shape_meta == OmegaConf.to_container(
                cfg.task.shape_meta, resolve=True)


def test_the_task_sets_the_drift_loss_recipe_and_the_command_line_wins():
    """task.drift_loss (configs/task/_base.yaml, a task file may change it) becomes the drifting
    policy's grouping / normalize / G; an explicit policy.* override still wins."""
    from omegaconf import OmegaConf

    def typed(*overrides, task="can_lowdim"):
        cfg = compose("train_policy", [f"task={task}", "policy=drifting", *overrides])
        return config_from_dict(OmegaConf.to_container(cfg.policy, resolve=True))

    pusht = typed(task="pusht_lowdim")
    assert (pusht.grouping, pusht.normalize, pusht.gen_per_obs) == ("per_timestep", "per_group", 8)
    for robomimic in ("lift_lowdim", "can_lowdim", "tool_hang_image"):  # the family's recipe
        assert typed(task=robomimic).grouping == "flat"
    task = typed("task.drift_loss.grouping=per_dim", "task.drift_loss.gen_per_obs=4")
    assert (task.grouping, task.normalize, task.gen_per_obs) == ("per_dim", "per_group", 4)
    cli = typed("task.drift_loss.grouping=per_dim", "policy.grouping=flat")
    assert cli.grouping == "flat"


# ------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("config", [DriftingConfig(shape_meta=IMAGE, crop_shape=(36, 36), **SMALL),
                                    DiffusionConfig(shape_meta=LOWDIM, scheduler="ddim",
                                                    num_inference_steps=5, **SMALL)])
def test_save_pretrained_round_trip_predicts_the_same_actions(tmp_path, config):
    policy = _fitted(make_policy(config)).eval()
    policy.save_pretrained(tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["config.json",
                                                                  "model.safetensors"]
    loaded, cfg = load_policy(tmp_path / "p")
    assert cfg == config and type(loaded) is type(policy)
    obs = {k: torch.rand(2, 2, *m["shape"]) for k, m in config.shape_meta["obs"].items()}
    a = policy.predict_action(obs, generator=torch.Generator().manual_seed(3))["action_pred"]
    b = loaded.predict_action(obs, generator=torch.Generator().manual_seed(3))["action_pred"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = "diffusion" if config.type == "drifting" else "drifting"
    with pytest.raises(ValueError, match=f"'type' is '{config.type}', but"):
        POLICIES[other].from_pretrained(tmp_path / "p")


def test_set_inference_is_saved_with_the_policy(tmp_path):
    policy = _fitted(make_policy(DiffusionConfig(shape_meta=LOWDIM, **SMALL)))
    policy.set_inference("ddim", 10)
    policy.save_pretrained(tmp_path)
    _, cfg = load_policy(tmp_path)
    assert (cfg.scheduler, cfg.num_inference_steps) == ("ddim", 10)


# ------------------------------------------------------------------- hostile checkpoints
@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A real training checkpoint (pretrained_model/ + train_config.yaml + state)."""
    from omegaconf import OmegaConf

    cfg = compose("train_policy", ["task=pusht_lowdim", "policy=drifting",
                                   "policy.down_dims=[16,32]",
                                   "policy.diffusion_step_embed_dim=16"])
    policy = _fitted(make_policy(config_from_dict(OmegaConf.to_container(cfg.policy,
                                                                          resolve=True))))
    return ckpt.write_checkpoint(tmp_path / "ckpt", cfg, policy, train_state={"step": 0})


def _eval_cli(checkpoint: Path, out: Path, capsys) -> str:
    rc = cli.main(["eval", "--checkpoint", str(checkpoint), "--out", str(out), "--n-test", "1"])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()
    return err


def _payload(target: Path) -> dict:
    """hydra's recipe for `Path(target).write_text("pwned")`."""
    return {"_target_": "pathlib.Path.write_text",
            "_args_": [{"_target_": "pathlib.Path", "_args_": [str(target)]}, "pwned"]}


def test_config_files_that_name_callables_are_refused_and_nothing_runs(checkpoint, tmp_path,
                                                                        capsys):
    victim = tmp_path / "victim.txt"
    train_cfg = checkpoint / ckpt.TRAIN_CONFIG
    original = train_cfg.read_text()
    data = yaml.safe_load(original)
    data["policy"] = _payload(victim)
    train_cfg.write_text(yaml.safe_dump(data))
    err = _eval_cli(checkpoint, tmp_path / "out", capsys)
    assert "names callables at ['policy._target_'" in err and not victim.exists()
    with pytest.raises(ValueError, match="names callables"):
        load_policy(checkpoint)
    assert not victim.exists()

    train_cfg.write_text(original)
    pretrained_cfg = checkpoint / ckpt.PRETRAINED / "config.json"
    good = json.loads(pretrained_cfg.read_text())
    bad_configs = [
        (_payload(victim), r"'type': expected one of \['diffusion', 'drifting'\], got None"),
        ({**good, **_payload(victim)}, r"unknown field\(s\) \['_args_', '_target_'\]"),
        ({**good, "type": "builtins.exec"}, r"got 'builtins.exec'"),
        ({**good, "extra": 1}, r"unknown field\(s\) \['extra'\]"),
        ({**good, "horizon": "16"}, r"DriftingConfig.horizon: expected int, got '16'"),
        ({**good, "shape_meta": {"obs": {}, "action": {"shape": [2]}}},
         r"shape_meta.obs: expected a non-empty mapping"),
    ]
    for bad, match in bad_configs:
        pretrained_cfg.write_text(json.dumps(bad))
        err = _eval_cli(checkpoint, tmp_path / "out", capsys)
        assert "config.json" in err and re.search(match, err), err
        assert not victim.exists()
    pretrained_cfg.write_text("{not json")
    assert "not a JSON file" in _eval_cli(checkpoint, tmp_path / "out", capsys)


def test_weights_that_do_not_match_the_policy_are_refused(checkpoint, tmp_path, capsys):
    weights = checkpoint / ckpt.PRETRAINED / "model.safetensors"
    good = load_file(str(weights))
    name = next(k for k in good if k.startswith("model."))
    cases = [
        ({k: v for k, v in good.items() if k != name}, f"missing tensors ['{name}']"),
        ({**good, "model.extra": torch.zeros(1)}, "unexpected tensors ['model.extra']"),
        ({**good, name: torch.zeros(*good[name].shape[:-1], good[name].shape[-1] + 1)},
         f"{name}: expected shape"),
        ({**good, "normalizer.params_dict.evil.scale": torch.ones(1)}, "normaliser keys"),
        ({k: v for k, v in good.items() if "input_stats.std" not in k or "action" not in k},
         "normaliser 'action': expected fields"),
    ]
    for state, match in cases:
        save_file(state, str(weights))
        err = _eval_cli(checkpoint, tmp_path / "out", capsys)
        assert "model.safetensors: does not match the policy" in err and match in err, err
    weights.write_bytes(b"\x00" * 64)
    assert "not a readable safetensors file" in _eval_cli(checkpoint, tmp_path / "out", capsys)


def test_device_follows_the_policy_through_set_normalizer():
    """.to(dev) then set_normalizer: every tensor on dev and policy.device == dev (meta here)."""
    for config in (DriftingConfig(shape_meta=IMAGE, crop_shape=(36, 36), **SMALL),
                   DiffusionConfig(shape_meta=LOWDIM, **SMALL)):
        policy = make_policy(config).to("meta")
        _fitted(policy)
        assert policy.device == torch.device("meta")
        assert {t.device.type for t in [*policy.parameters(), *policy.buffers()]} == {"meta"}
