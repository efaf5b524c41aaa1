"""fedinfer: federated learning and federated inference with DP and secure aggregation."""

__version__ = "0.1.0"
