"""The math modules and the Lightning-free model import neither Lightning nor Hydra."""

import subprocess
import sys


def test_math_modules_are_plain_pytorch():
    code = (
        "import sys\n"
        "import flowdiff.paths, flowdiff.objectives, flowdiff.couplings, flowdiff.samplers, flowdiff.guidance\n"
        "import flowdiff.dynamics, flowdiff.densities, flowdiff.metrics, flowdiff.model\n"
        "import flowdiff.likelihood, flowdiff.straightness, flowdiff.nets\n"
        "banned = ('lightning', 'pytorch_lightning', 'hydra', 'omegaconf')\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in banned]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
