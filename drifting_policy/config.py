"""Where the hydra configs live and the OmegaConf resolvers they use."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

OmegaConf.register_new_resolver("sub", lambda a, b: a - b, replace=True)


def config_dir() -> Path:
    """configs/ of the source tree (editable install) or the packaged copy."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "configs", here / "configs"):
        if (candidate / "train_policy.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"configs/train_policy.yaml not found next to {here}")


def compose(name: str = "train_policy", overrides: list[str] | None = None):
    """Compose a config from configs/ with hydra command-line style overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(name, overrides=list(overrides or []))


def config_choices(group: str) -> list[str]:
    """The selectable configs of a group (``task``, ``policy``, ``size``): configs/<group>/*.yaml
    without the shared ``_*.yaml`` bases, sorted."""
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml")
                  if not p.name.startswith("_"))
