"""Adding a sampler is one class and one YAML file, with no list of names edited anywhere (docs/DESIGN.md)."""

import pytest

from flowdiff.build import build_run
from flowdiff.errors import ConfigError
from flowdiff.runs import train
from helpers import FAST, compose_cfg

SAMPLER = '''
from flowdiff.samplers.base import FixedStepSampler


class RalstonSampler(FixedStepSampler):
    """Ralston's second-order Runge-Kutta method: 2 NFE per step."""

    evaluations_per_step = 2

    def step(self, f, x, t, h):
        k1 = f(x, t)
        k2 = f(x + 2 / 3 * h * k1, t + 2 / 3 * h)
        return x + h * (k1 / 4 + 3 / 4 * k2)
'''

YAML = """# Ralston's method, from outside the project
_target_: ralston_sampler.RalstonSampler
steps: ${default:}
denoise: ${default:}
"""


def test_a_new_sampler_is_one_class_and_one_yaml(tmp_path, monkeypatch):
    import sys

    (tmp_path / "ralston_sampler.py").write_text(
        SAMPLER + "\n\nclass NoisyRalston(RalstonSampler):\n    stochastic = True\n    fields = ('velocity', 'score')\n"
    )
    (tmp_path / "conf" / "sampler").mkdir(parents=True)
    (tmp_path / "conf" / "sampler" / "ralston.yaml").write_text(YAML)
    (tmp_path / "conf" / "sampler" / "ralston_sde.yaml").write_text(YAML.replace("RalstonSampler", "NoisyRalston"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "ralston_sampler", raising=False)
    search = f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    cfg = compose_cfg([search, "sampler=ralston", "sampler.steps=7", *FAST, "callbacks.plot=null"], tmp_path / "run")
    metrics = train(cfg)
    assert metrics["nfe"] == 14  # the class's own evaluations_per_step, 7 steps
    assert 0 < metrics["val/w2"] < 10
    # the rules ask the class what it is: a sampler that needs the score is refused on a path without one
    bad = compose_cfg([search, "sampler=ralston_sde", "data.source=moons", *FAST], tmp_path / "refused")
    with pytest.raises(ConfigError, match="sampler=ralston_sde needs a Gaussian path"):
        build_run(bad)
