"""robomimic tasks on robosuite 1.5: gymnasium ids, env, scripted experts.

Importing this package only registers the ids (cheap); robosuite loads on `gymnasium.make`:
    RobomimicLift-v0, RobomimicCan-v0, RobomimicToolHang-v0
kwargs (see `envs.robomimic.env.RobomimicEnv`): image, abs_actions, camera_size, obs_keys,
render_size, render_camera, max_episode_steps, terminate_on_success, fast_render, env_args.
Without cameras the observation is a flat float32 vector (the obs_keys concatenated); with
`image=True` a dict of images [3, H, W] in [0, 1] and low-dim keys.
"""

import gymnasium

_ENTRY_POINT = "envs.robomimic.env:RobomimicEnv"

for _env_id, _task in (("RobomimicLift-v0", "lift"), ("RobomimicCan-v0", "can"),
                       ("RobomimicToolHang-v0", "tool_hang")):
    if _env_id not in gymnasium.registry:
        gymnasium.register(id=_env_id, entry_point=_ENTRY_POINT, kwargs={"task": _task})
