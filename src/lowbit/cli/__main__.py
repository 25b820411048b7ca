"""``python -m lowbit.cli …`` (the same as ``lowbit …``)."""

import sys

from lowbit.cli import main

sys.exit(main())
