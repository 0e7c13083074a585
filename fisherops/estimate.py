"""Randomised estimates on any lineax operator: trace, diagonal, spectral density
and extreme eigenpairs (see `fisherops/_estimate.py`)."""

from ._estimate import diagonal as diagonal
from ._estimate import eigenpairs as eigenpairs
from ._estimate import spectral_density as spectral_density
from ._estimate import trace as trace

__all__ = ["diagonal", "eigenpairs", "spectral_density", "trace"]
