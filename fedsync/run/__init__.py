"""The run: its config and defaults, the start checks, trust, liveness and the heartbeat, shared by every role;
each role's own bookkeeping in its folder (coordinating/, working/, submitting/, inspecting/). The roles
themselves are fedsync/coordinator.py, fedsync/worker.py and fedsync/infer.py."""
