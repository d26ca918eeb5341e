"""``python -m hiervision`` (and ``torchrun ... -m hiervision train ...``) runs the command line."""

import sys

from hiervision.cli import main

sys.exit(main())
