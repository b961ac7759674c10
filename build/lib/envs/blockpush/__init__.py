"""BlockPush (IBC / Diffusion Policy's multimodal two-block pushing task on pybullet): gymnasium
ids, env, multimodal scripted oracle and the p1/p2 metric.

Importing this package only registers the ids (cheap); pybullet loads on `gymnasium.make`:
    BlockPushMultimodal-v0       observation (16,), action = absolute effector target xy
    BlockPushMultimodalDelta-v0  the same with actions = displacement of the effector target
Episodes end at 350 steps through the env's own `truncated` flag (no TimeLimit wrapper).
"""

import gymnasium

_ENTRY_POINT = "envs.blockpush.env:BlockPushMultimodalEnv"

for _env_id, _abs_action in (("BlockPushMultimodal-v0", True),
                             ("BlockPushMultimodalDelta-v0", False)):
    if _env_id not in gymnasium.registry:
        gymnasium.register(id=_env_id, entry_point=_ENTRY_POINT,
                           kwargs={"abs_action": _abs_action})
