"""Train a flow-matching / diffusion model: ``python train.py path=condot objective=cfm``.

Sweep with ``-m``: ``python train.py -m path=condot,cosine objective=cfm,score,noise sampler=euler,heun``.
"""

import hydra
from omegaconf import DictConfig

import flowdiff.configs  # noqa: F401  (light: the resolvers of the config files)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from flowdiff.cli.train import main as run  # torch and Lightning load after Hydra composed: typos fail at once

    return run(cfg)


if __name__ == "__main__":
    main()
