"""fedsync: federated training over one shared folder."""

__version__ = "0.2.0"
