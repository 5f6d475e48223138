"""Differential privacy: the settings, the noise and clipping maths, and the accountant's arithmetic (through
dp-accounting). No I/O here; the coordinator's budget (fedsync/run/coordinating/budget.py) and the worker's DP-SGD
(fedsync/learning/dp_sgd.py) use it (README, "Privacy"; docs/PROTOCOL.md section 5.17)."""
