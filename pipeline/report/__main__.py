"""`python -m pipeline.report PATH [PATH ...] [--out DIR]`: see pipeline/report/table.py."""

import sys

from pipeline.report.table import main

sys.exit(main())
