"""``python -m lowbit …`` (what ``torchrun --nproc-per-node N -m lowbit finetune …`` runs)."""

import sys

from lowbit.cli import main

sys.exit(main())
