"""Kronecker-factored curvature (KFAC). Work in progress: see issue 12."""

import lineax as lx


class KFACOperator(lx.AbstractLinearOperator):
    """Kronecker-factored GGN / Fisher. Not implemented yet."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("KFACOperator is not implemented yet.")

    def mv(self, vector):
        raise NotImplementedError

    def as_matrix(self):
        raise NotImplementedError

    def transpose(self):
        return self

    def in_structure(self):
        raise NotImplementedError

    def out_structure(self):
        raise NotImplementedError

    def inverse(self, prior_precision) -> lx.AbstractLinearOperator:
        """`(K + Λ)^{-1}`."""
        raise NotImplementedError

    def is_exact(self, prior_precision) -> bool:
        """Whether `inverse`/`logdet`/`inverse_sqrt_mv` are exact for this prior."""
        raise NotImplementedError

    def logdet(self, prior_precision):
        """`log det(K + Λ)`."""
        raise NotImplementedError

    def inverse_sqrt_mv(self, prior_precision, noise):
        """`(K + Λ)^{-1/2} noise`."""
        raise NotImplementedError
