"""`python -m cbmir.report SWEEP_DIR ...`, the same as `cbmir-report`."""

import sys

from cbmir.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
