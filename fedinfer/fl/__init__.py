"""Flower touchpoints: ServerApp/ClientApp factories, strategies, round loop, secure aggregation."""
