"""Headless pygame drawing of a PushT scene, pixel-compatible with Diffusion Policy's images.

Diffusion Policy draws the 512x512 workspace with pygame (goal T filled in light green, then
pymunk's debug draw of the space through its own draw options) and shrinks it with
`cv2.resize` (bilinear). Policies trained on its published `pusht_cchi_v7_replay.zarr` images
only transfer if our frames are drawn the same way, so this module repeats that pipeline:
same colours, same primitives, same order (pymunk's debug-draw traversal, which also draws
the contact points as short red segments), same resize.

Imported lazily by the env: pygame is only loaded when a frame is needed.
"""

from __future__ import annotations

import os

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # never open a window
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pygame  # noqa: E402
import pymunk  # noqa: E402
from pymunk.space_debug_draw_options import SpaceDebugColor  # noqa: E402

WINDOW_SIZE = 512

# pygame's named colours that Diffusion Policy uses (https://htmlcolorcodes.com/color-names)
BACKGROUND = (255, 255, 255)
GOAL_COLOR = (144, 238, 144)  # LightGreen
WALL_COLOR = (211, 211, 211, 255)  # LightGray
AGENT_COLOR = (65, 105, 225, 255)  # RoyalBlue
BLOCK_COLOR = (119, 136, 153, 255)  # LightSlateGray
ACTION_MARKER_COLOR = (255, 0, 0)

POLYGON_EDGE_RADIUS = 2  # polygons get a 2 px outline in their base colour, filled lighter


def _lighter(color: SpaceDebugColor) -> tuple[int, int, int, int]:
    """The fill shade: every channel x1.2 in float32, capped at 255, rounded."""
    scaled = np.minimum(np.float32(1.2) * np.float32(color), np.float32(255))
    return tuple(round(float(c)) for c in scaled)


def _pixel(p) -> tuple[int, int]:
    return round(p[0]), round(p[1])


class _SceneDrawOptions(pymunk.SpaceDebugDrawOptions):
    """pymunk debug-draw callbacks rasterised with pygame onto `surface` (y axis points down)."""

    def __init__(self, surface: pygame.Surface) -> None:
        self.surface = surface
        super().__init__()

    def color_for_shape(self, shape: pymunk.Shape) -> SpaceDebugColor:
        body_type = shape.body.body_type
        if body_type == pymunk.Body.STATIC:
            return SpaceDebugColor(*WALL_COLOR)
        if body_type == pymunk.Body.KINEMATIC:
            return SpaceDebugColor(*AGENT_COLOR)
        return SpaceDebugColor(*BLOCK_COLOR)

    def draw_circle(self, pos, angle, radius, outline_color, fill_color) -> None:
        # a disc in the base colour with a lighter disc 4 px smaller on top: a ring look
        center = _pixel(pos)
        pygame.draw.circle(self.surface, fill_color.as_int(), center, round(radius), 0)
        pygame.draw.circle(self.surface, _lighter(fill_color), center, round(radius - 4), 0)

    def draw_segment(self, a, b, color) -> None:
        pygame.draw.aalines(self.surface, color.as_int(), False, [_pixel(a), _pixel(b)])

    def draw_fat_segment(self, a, b, radius, outline_color, fill_color) -> None:
        color = fill_color.as_int()
        p, q = _pixel(a), _pixel(b)
        width = round(max(1, 2 * radius))
        pygame.draw.lines(self.surface, color, False, [p, q], width)
        if width <= 2:
            return
        # widen with a rectangle of half-width `radius` around the segment and round the caps
        dx, dy = abs(q[1] - p[1]), abs(q[0] - p[0])
        if dx == 0 and dy == 0:
            return
        scale = radius / (dx * dx + dy * dy) ** 0.5
        ox, oy = round(dx * scale), round(dy * scale)
        corners = [(p[0] - ox, p[1] - oy), (p[0] + ox, p[1] + oy),
                   (q[0] + ox, q[1] + oy), (q[0] - ox, q[1] - oy)]
        pygame.draw.polygon(self.surface, color, corners)
        pygame.draw.circle(self.surface, color, p, round(radius))
        pygame.draw.circle(self.surface, color, q, round(radius))

    def draw_polygon(self, verts, radius, outline_color, fill_color) -> None:
        points = [_pixel(v) for v in verts]
        pygame.draw.polygon(self.surface, _lighter(fill_color), points + points[:1])
        for i, a in enumerate(verts):
            b = verts[(i + 1) % len(verts)]
            self.draw_fat_segment(a, b, POLYGON_EDGE_RADIUS, fill_color, fill_color)

    def draw_dot(self, size, pos, color) -> None:
        pygame.draw.circle(self.surface, color.as_int(), _pixel(pos), round(size), 0)


def draw_space(space: pymunk.Space, goal_polygons: list[np.ndarray] | None = None) -> np.ndarray:
    """Full-resolution frame (512, 512, 3) uint8, read-only, of `space` over the goal polygons
    (world xy)."""
    surface = pygame.Surface((WINDOW_SIZE, WINDOW_SIZE))
    surface.fill(BACKGROUND)
    for polygon in goal_polygons or ():
        points = [_pixel(p) for p in polygon]
        pygame.draw.polygon(surface, GOAL_COLOR, points + points[:1])
    space.debug_draw(_SceneDrawOptions(surface))
    rgb = pygame.image.tobytes(surface, "RGB")  # row-major (y, x, c)
    return np.frombuffer(rgb, dtype=np.uint8).reshape(WINDOW_SIZE, WINDOW_SIZE, 3)


def resize(frame: np.ndarray, size: int) -> np.ndarray:
    """Bilinear shrink of a square frame to (size, size, 3), as Diffusion Policy does."""
    if frame.shape[0] == size:
        return frame.copy()
    return cv2.resize(frame, (size, size))


def draw_action_marker(img: np.ndarray, action: np.ndarray) -> np.ndarray:
    """Red cross at the commanded target (512-px coordinates), in place; returns `img`.

    Diffusion Policy scales the target by 96/512 whatever the render size (so its marker is
    misplaced above 96 px); here it is scaled to the image's own size, identical at 96 px.
    """
    size = img.shape[0]
    coord = (np.asarray(action, dtype=np.float64) / WINDOW_SIZE * size).astype(np.int32)
    cv2.drawMarker(img, (int(coord[0]), int(coord[1])), color=ACTION_MARKER_COLOR,
                   markerType=cv2.MARKER_CROSS, markerSize=int(8 / 96 * size),
                   thickness=max(1, int(1 / 96 * size)))
    return img
