"""The one way the tests compare numbers: the error of `got` relative to the scale of the reference `want`."""

import numpy as np


def rel_err(got, want, ord=np.inf) -> float:
    """‖got − want‖ / ‖want‖ over all elements, in float64. ord=inf (default): max |got − want| / max |want|,
    the parity measure; ord=2: the L2 (Frobenius) ratio, the measure of the compression tests."""
    got, want = np.asarray(got, np.float64).ravel(), np.asarray(want, np.float64).ravel()
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.linalg.norm(got - want, ord) / np.linalg.norm(want, ord))


def assert_close(got, want, tol: float, ord=np.inf, what: str = "") -> None:
    """Assert the shapes agree and rel_err(got, want, ord) < tol."""
    assert np.shape(got) == np.shape(want), f"{what} shape {np.shape(got)} != {np.shape(want)}"
    err = rel_err(got, want, ord)
    assert err < tol, f"{what} relative error {err:.3g} >= {tol:g}"
