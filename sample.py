"""Sample a trained model: ``python sample.py ckpt=logs/.../last.ckpt sampler=heun sampler.steps=10``."""

import hydra
from omegaconf import DictConfig

import flowdiff.configs  # noqa: F401  (light: the resolvers of the config files)


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> float:
    from flowdiff.cli.sample import main as run  # torch and Lightning load after Hydra composed: typos fail at once

    return run(cfg)


if __name__ == "__main__":
    main()
