"""lineax's structural queries, answered once for every fisherops operator."""

import lineax as lx


def register_symmetric(
    *classes: type, positive_semidefinite: bool, diagonal: bool = False
) -> None:
    """Register `classes` as symmetric for lineax, positive semidefinite or not
    (an indefinite operator, the Hessian, is neither positive nor negative
    semidefinite).

    With `diagonal=True` they are also diagonal (hence tridiagonal and
    triangular); otherwise they have none of those structures.
    """
    answers = (
        (lx.is_symmetric, True),
        (lx.is_positive_semidefinite, positive_semidefinite),
        (lx.is_negative_semidefinite, False),
        (lx.is_diagonal, diagonal),
        (lx.is_tridiagonal, diagonal),
        (lx.has_unit_diagonal, False),
        (lx.is_lower_triangular, diagonal),
        (lx.is_upper_triangular, diagonal),
    )
    for query, answer in answers:
        for cls in classes:
            query.register(cls)(lambda operator, answer=answer: answer)


def register_symmetric_psd(*classes: type, diagonal: bool = False) -> None:
    """Register `classes` as symmetric positive semidefinite for lineax."""
    register_symmetric(*classes, positive_semidefinite=True, diagonal=diagonal)
