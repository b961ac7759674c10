"""Ships configs/ inside the wheel as drifting_policy/configs (metadata lives in pyproject.toml).

An editable install reads configs/ from the source tree; a regular install (`pip install .`,
a wheel) gets this copy, which drifting_policy.config.config_dir() finds next to the package.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConfigs(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            target = Path(self.build_lib) / "drifting_policy" / "configs"
            shutil.copytree(Path(__file__).parent / "configs", target, dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithConfigs})
