"""prepare's and verify's process pool: results in job order, jobs drawn lazily (bounded work in flight)."""
from __future__ import annotations

import pytest

from tltrain.data.pool import pool_map


def _square(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative job {x}")
    return x * x


def test_order_and_laziness():
    drawn = []

    def jobs():
        for x in range(500):
            drawn.append(x)
            yield x

    results = pool_map(_square, jobs(), workers=2, chunksize=5, count=500)
    assert next(results) == 0
    assert len(drawn) <= 4 * 2 * 5 + 5  # 4 chunks per worker in flight (+ the one refilled), not all 500
    assert [0, *results] == [x * x for x in range(500)]


@pytest.mark.parametrize("workers", [1, 3])
def test_errors_propagate(workers):
    with pytest.raises(ValueError, match="negative job -1"):
        list(pool_map(_square, [1, 2, -1, 4], workers=workers, chunksize=1))
