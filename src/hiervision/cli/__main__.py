"""``python -m hiervision.cli`` (as the tests and benchmarks/serve_load.py start it) runs the command line."""

import sys

from hiervision.cli import main

sys.exit(main())
