"""A regular (non-editable) install carries the hydra configs: build the wheel, install it into
an empty directory and compose configs from outside the source tree."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_ships_configs_and_composes_outside_the_repo(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                          str(REPO)], check=True, capture_output=True)
    (wheel,) = wheels.glob("drifting_policy-*.whl")
    subprocess.run(pip + ["install", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    probe = (
        "import drifting_policy.config as c\n"
        "print(c.config_dir())\n"
        "print(c.compose('train_policy', ['task=can_image', 'size=paper_image']).task.env.id)\n"
        "print(c.compose('image_gen/latent_b2').model.preset)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                         text=True, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    where, env_id, preset = out.stdout.split()
    assert Path(where) == target / "drifting_policy" / "configs"
    assert (env_id, preset) == ("RobomimicCan-v0", "B/2")
    # every config of the source tree is in the wheel, byte for byte
    for src in (REPO / "configs").rglob("*.yaml"):
        assert (Path(where) / src.relative_to(REPO / "configs")).read_bytes() == src.read_bytes()
