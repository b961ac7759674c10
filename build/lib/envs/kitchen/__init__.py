"""Franka Kitchen (D4RL / Diffusion Policy's kitchen task): gymnasium id, env, scripted expert.

Importing this package only registers the id (cheap); MuJoCo loads on `gymnasium.make`:
    Kitchen-v0   obs (60,) float32 in D4RL's layout, action (9,) joint velocities in [-1, 1],
                 all seven sub-tasks, reward +1 per completed sub-task, 280 steps.
Episodes end at 280 steps through the env's own `truncated` flag (no TimeLimit wrapper).
"""

import gymnasium

if "Kitchen-v0" not in gymnasium.registry:
    gymnasium.register(id="Kitchen-v0", entry_point="envs.kitchen.env:KitchenEnv")
