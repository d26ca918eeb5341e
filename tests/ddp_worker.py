"""Run by ``torchrun`` from tests/test_distributed.py: trains each config of a JSON spec in one job.

Not a test module (pytest does not collect it): one torchrun start for many runs keeps the suite fast.
"""

import json
import sys

from hiervision.config import load_config
from hiervision.training import train

for run in json.loads(open(sys.argv[1], encoding="utf-8").read()):
    train(load_config(overrides=run["overrides"]), run["out"], resume=run.get("resume", True))
