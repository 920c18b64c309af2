"""Adding a sampler is one class and one YAML file, with no list of names edited anywhere (docs/DESIGN.md)."""

import json
import os
import subprocess
import sys

from helpers import FAST, ROOT

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


def test_a_new_sampler_is_one_class_and_one_yaml(tmp_path):
    (tmp_path / "ralston_sampler.py").write_text(SAMPLER)
    (tmp_path / "conf" / "sampler").mkdir(parents=True)
    (tmp_path / "conf" / "sampler" / "ralston.yaml").write_text(YAML)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = tmp_path / "run"
    cmd = [sys.executable, "train.py", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "sampler=ralston"]
    cmd += ["sampler.steps=7", *FAST, "callbacks.plot=null", f"hydra.run.dir={run}"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**env, "WANDB_MODE": "offline"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["nfe"] == 14  # the class's own evaluations_per_step, 7 steps
    assert 0 < metrics["val/w2"] < 10
    # the rules ask the class what it is: a sampler that needs the score is refused on a path without one
    (tmp_path / "conf" / "sampler" / "ralston_sde.yaml").write_text(YAML.replace("RalstonSampler", "NoisyRalston"))
    (tmp_path / "ralston_sampler.py").write_text(
        SAMPLER + "\n\nclass NoisyRalston(RalstonSampler):\n    stochastic = True\n    fields = ('velocity', 'score')\n"
    )
    cmd[3], cmd[-1] = "sampler=ralston_sde", f"hydra.run.dir={tmp_path / 'refused'}"
    bad = subprocess.run([*cmd, "data.source=moons"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "sampler=ralston_sde needs a Gaussian path" in bad.stderr + bad.stdout
