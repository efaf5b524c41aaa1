"""The image example: a small CNN with BatchNorm on scikit-learn's 8x8 digits (README.md)."""
