"""Flower touchpoints: ServerApp/ClientApp factories, strategies, the round loop, secure aggregation."""
