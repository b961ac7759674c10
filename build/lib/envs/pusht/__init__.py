"""PushT (Diffusion Policy's task): gymnasium ids, env, scripted expert.

Importing this package only registers the ids (cheap); the simulator loads on `gymnasium.make`:
    PushT-v0       keypoint observations (20,): 9 block keypoints xy + agent xy
    PushTImage-v0  {"image": (3, 96, 96) in [0, 1], "agent_pos": (2,)}
    PushTState-v0  state (5,): agent xy, block xy, block angle
Episodes end at 300 steps through the env's own `truncated` flag (no TimeLimit wrapper).
"""

import gymnasium

_ENTRY_POINT = "envs.pusht.env:PushTEnv"

for _env_id, _obs_type in (("PushT-v0", "keypoints"), ("PushTImage-v0", "image"),
                           ("PushTState-v0", "state")):
    if _env_id not in gymnasium.registry:
        gymnasium.register(id=_env_id, entry_point=_ENTRY_POINT, kwargs={"obs_type": _obs_type})
