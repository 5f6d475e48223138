"""The run: its config, the start checks, and the two roles' bookkeeping (the round ledger, worker liveness); the roles
themselves are fedsync/coordinator.py and fedsync/worker.py."""
