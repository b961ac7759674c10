"""``DriftingConfig``: LeRobot's config for the one-step Drifting Policy (type "drifting").

Field names and defaults are this project's (``configs/policy/drifting_unet.yaml``,
``configs/train_policy.yaml``, ``drifting_policy.policy.DriftingConfig``): Diffusion Policy's
UNet and image encoder, T = 16, To = 2, Ta = 8, G = 8 generated chunks per observation, AdamW
lr 1e-4 (betas 0.95 / 0.999, weight decay 1e-6) with 500 warmup steps and a cosine schedule.
LeRobot's dataset features become the policy's ``shape_meta``: each ``observation.*`` state /
environment-state feature a low_dim key, each camera an rgb key, ``action`` the action.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

from lerobot.configs.policies import PreTrainedConfig
from lerobot.configs.types import FeatureType, NormalizationMode
from lerobot.optim.optimizers import AdamWConfig
from lerobot.optim.schedulers import DiffuserSchedulerConfig

from drifting_policy.policy import DriftingConfig as CoreConfig

# the project's policy fields and their defaults: one source for both configs
_CORE = {f.name: f.default for f in fields(CoreConfig) if f.default is not MISSING}


def core_key(feature: str) -> str:
    """A LeRobot feature name as a key of the project's networks (module names take no dots):
    ``observation.images.top`` -> ``observation_images_top``."""
    return feature.replace(".", "_")


@PreTrainedConfig.register_subclass("drifting")
@dataclass
class DriftingConfig(PreTrainedConfig):
    """The drifting policy in LeRobot.

    Inputs: every ``observation.*`` feature of the dataset (state and environment state as low-dim
    vectors, cameras as images [3, H, W] in [0, 1]); output ``action`` [Da]. Normalisation lives
    in the processors (``processor_drifting``): MIN_MAX to [-1, 1] for states and actions, the
    same map this project's "limits" normaliser fits; images pass through and the encoder maps
    [0, 1] -> [-1, 1].

    Windows: observation steps -To+1..0, action steps -To+1..-To+T, and the last
    ``drop_n_last_frames`` = T - Ta - To + 1 frames of each episode never start a window, which
    gives exactly the windows of this project's sampler (pad_before To - 1, pad_after Ta - 1).
    Padded action steps (``action_is_pad``) are left out of the drift problems.
    """

    n_obs_steps: int = _CORE["n_obs_steps"]
    horizon: int = _CORE["horizon"]
    n_action_steps: int = _CORE["n_action_steps"]
    drop_n_last_frames: int = 7  # horizon - n_action_steps - n_obs_steps + 1

    normalization_mapping: dict[str, NormalizationMode] = field(
        default_factory=lambda: {
            "VISUAL": NormalizationMode.IDENTITY,
            "STATE": NormalizationMode.MIN_MAX,
            "ENV": NormalizationMode.MIN_MAX,
            "ACTION": NormalizationMode.MIN_MAX,
        }
    )

    # ConditionalUnet1D, image encoder (ResNet-18 with GroupNorm, spatial softmax) and drift loss:
    # the project's DriftingConfig fields, with its defaults (Diffusion Policy's sizes; this
    # project's size=cpu: down_dims [32, 64, 128], diffusion_step_embed_dim 32)
    down_dims: tuple[int, ...] = _CORE["down_dims"]
    diffusion_step_embed_dim: int = _CORE["diffusion_step_embed_dim"]
    kernel_size: int = _CORE["kernel_size"]
    n_groups: int = _CORE["n_groups"]
    cond_predict_scale: bool = _CORE["cond_predict_scale"]
    crop_shape: tuple[int, int] | None = _CORE["crop_shape"]
    num_kp: int = _CORE["num_kp"]
    feature_dim: int = _CORE["feature_dim"]
    share_rgb_model: bool = _CORE["share_rgb_model"]
    gen_per_obs: int = _CORE["gen_per_obs"]
    grouping: str = _CORE["grouping"]
    normalize: str = _CORE["normalize"]
    temperatures: tuple[float, ...] = _CORE["temperatures"]
    affinity_floor: float = _CORE["affinity_floor"]
    # test-time selection: K chunks per observation in the same single pass, the medoid executed
    n_samples: int = 1
    select: str = "medoid"

    # training presets (this project's train_policy.yaml)
    optimizer_lr: float = 1e-4
    optimizer_betas: tuple[float, float] = (0.95, 0.999)
    optimizer_eps: float = 1e-8
    optimizer_weight_decay: float = 1e-6
    scheduler_name: str = "cosine"
    scheduler_warmup_steps: int = 500

    def __post_init__(self) -> None:
        super().__post_init__()
        expected = self.horizon - self.n_action_steps - self.n_obs_steps + 1
        if self.drop_n_last_frames != expected:
            raise ValueError(f"drop_n_last_frames: expected horizon - n_action_steps - "
                             f"n_obs_steps + 1 = {expected} (this project's window rule), got "
                             f"{self.drop_n_last_frames}")
        if self.n_samples < 1:
            raise ValueError(f"n_samples: expected >= 1, got {self.n_samples}")
        self.core_config(validate_only=True)

    def core_config(self, validate_only: bool = False) -> CoreConfig:
        """The project's typed config for these features (validated there: one error naming the
        field). ``validate_only``: check the policy fields before features are known."""
        obs = {core_key(k): {"shape": list(f.shape), "type": "rgb" if f.type is FeatureType.VISUAL
                             else "low_dim"} for k, f in self.input_features.items()}
        action = self.output_features.get("action")
        if validate_only and not (obs and action):
            obs, shape = {"state": {"shape": [1], "type": "low_dim"}}, [1]
        else:
            shape = list(action.shape) if action else None
        return CoreConfig(shape_meta={"obs": obs, "action": {"shape": shape}},
                          **{name: getattr(self, name) for name in _CORE})

    def validate_features(self) -> None:
        if not self.input_features:
            raise ValueError("drifting: no observation.* input features in the dataset")
        if "action" not in self.output_features:
            raise ValueError(f"drifting: needs an 'action' output feature, got "
                             f"{sorted(self.output_features)}")
        for key, feature in self.input_features.items():
            if feature.type is not FeatureType.VISUAL and len(feature.shape) != 1:
                raise ValueError(f"drifting: input '{key}': expected a 1-D state, got shape "
                                 f"{tuple(feature.shape)}")
        self.core_config()

    def get_optimizer_preset(self) -> AdamWConfig:
        return AdamWConfig(lr=self.optimizer_lr, betas=self.optimizer_betas,
                           eps=self.optimizer_eps, weight_decay=self.optimizer_weight_decay)

    def get_scheduler_preset(self) -> DiffuserSchedulerConfig:
        return DiffuserSchedulerConfig(name=self.scheduler_name,
                                       num_warmup_steps=self.scheduler_warmup_steps)

    @property
    def observation_delta_indices(self) -> list[int]:
        return list(range(1 - self.n_obs_steps, 1))

    @property
    def action_delta_indices(self) -> list[int]:
        return list(range(1 - self.n_obs_steps, 1 - self.n_obs_steps + self.horizon))

    @property
    def reward_delta_indices(self) -> None:
        return None
