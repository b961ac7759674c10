"""Rotation conversions for absolute robomimic actions (Diffusion Policy's conventions).

Absolute OSC_POSE actions hold an axis-angle (rotation-vector) orientation; Diffusion Policy trains
on the continuous 6-d representation instead: the first two ROWS of the rotation matrix (the
pytorch3d ``matrix_to_rotation_6d`` convention), recovered by Gram-Schmidt.

    pose7 = [x, y, z, rx, ry, rz, gripper]             (what robosuite executes)
    pose10 = [x, y, z, r00, r01, r02, r10, r11, r12, gripper]   (what the policy predicts)

The env executes 10-d actions with :func:`abs_action_10_to_7` and the experts record them with
:func:`abs_action_7_to_10`; the dataset code (`drifting_policy.data`) imports these same
functions from here (drifting_policy may import envs; envs never import drifting_policy).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation


def axis_angle_to_rot6d(rotvec: np.ndarray) -> np.ndarray:
    """[..., 3] rotation vectors -> [..., 6] first two rows of the rotation matrix."""
    rotvec = np.asarray(rotvec, dtype=np.float64)
    matrix = Rotation.from_rotvec(rotvec.reshape(-1, 3)).as_matrix()
    return matrix[:, :2, :].reshape(rotvec.shape[:-1] + (6,))


def rot6d_to_axis_angle(rot6d: np.ndarray) -> np.ndarray:
    """[..., 6] -> [..., 3] rotation vectors; the two rows need not be orthonormal
    (Gram-Schmidt, as pytorch3d's ``rotation_6d_to_matrix``)."""
    rot6d = np.asarray(rot6d, dtype=np.float64)
    a1, a2 = rot6d.reshape(-1, 6)[:, :3], rot6d.reshape(-1, 6)[:, 3:]
    b1 = a1 / np.linalg.norm(a1, axis=-1, keepdims=True)
    b2 = a2 - np.sum(b1 * a2, axis=-1, keepdims=True) * b1
    b2 /= np.linalg.norm(b2, axis=-1, keepdims=True)
    matrix = np.stack([b1, b2, np.cross(b1, b2)], axis=-2)
    return Rotation.from_matrix(matrix).as_rotvec().reshape(rot6d.shape[:-1] + (3,))


def abs_action_7_to_10(action: np.ndarray) -> np.ndarray:
    """[..., 7] (pos, axis-angle, gripper) -> [..., 10] (pos, rotation-6d, gripper), float32."""
    action = np.asarray(action)
    _check_last_dim(action, 7)
    rot = axis_angle_to_rot6d(action[..., 3:6])
    return np.concatenate([action[..., :3], rot, action[..., 6:]], axis=-1).astype(np.float32)


def abs_action_10_to_7(action: np.ndarray) -> np.ndarray:
    """[..., 10] (pos, rotation-6d, gripper) -> [..., 7] (pos, axis-angle, gripper), float32."""
    action = np.asarray(action)
    _check_last_dim(action, 10)
    rot = rot6d_to_axis_angle(action[..., 3:9])
    return np.concatenate([action[..., :3], rot, action[..., 9:]], axis=-1).astype(np.float32)


def _check_last_dim(action: np.ndarray, dim: int) -> None:
    if action.ndim == 0 or action.shape[-1] != dim:
        raise ValueError(f"absolute action: expected shape [..., {dim}], got {action.shape}")
