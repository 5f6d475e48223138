"""Every default of a command's options, in one place, with its meaning and unit: the command line (fedsync/cli)
and the roles' option records (CoordinatorOptions, WorkerOptions, InferOptions) both read them from here.

The defaults of a run's config (what every machine of a run shares: lr, quorum, round_timeout, ...) are the
keys of configs/digits.yaml, each with its meaning and unit beside it; a user's config file or --set names only
what it changes (fedsync/run/config.py)."""

from __future__ import annotations

import re

SHARE = "rounds"       # the share: a folder (relative to where the command runs) or scheme://bucket/prefix
CONFIG = "digits"      # the run config: a built-in name (configs/NAME.yaml) or a YAML file
ROUNDS = 20            # the run's total number of rounds (not rounds to add)
WATCH = "auto"         # how a process notices changes: auto (inotify on local disks, else polling) | events | poll
DEVICE = "auto"        # where to train or evaluate: the first CUDA GPU this torch drives, then MPS, then the CPU
DEVICE_SPEC = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")  # what --device accepts
CAPTURE = "auto"       # a worker's training step in CUDA graphs where the GPU supports them (capability 7.0+)
RESCAN_S = 2.0         # seconds between a coordinator's or worker's full rescans of the share when nothing wakes it
INFER_RESCAN_S = 1.0   # seconds between a submitter's rescans of its job (chunks are short)
INFER_MODEL = "final"  # the model an inference job runs: final | a closed round's number | a model file
DEMO_WORKERS = 3       # local worker processes `fedsync demo` starts
DEMO_ROUNDS = 20       # rounds `fedsync demo` runs
