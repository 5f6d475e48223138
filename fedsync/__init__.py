"""fedsync: federated training over one shared folder."""

__version__ = "0.1.0"
