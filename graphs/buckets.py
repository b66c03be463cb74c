"""The bucket rule: which captured batch size serves a batch of `num_tokens` rows.

A batch is served by the smallest captured bucket that holds it (round *up*); the
rows between `num_tokens` and the bucket are padding. A batch larger than the largest
bucket has no graph (`bucket_for` returns None) and the caller runs eagerly.
"""

from __future__ import annotations

import bisect
import itertools
from collections import Counter
from collections.abc import Iterable

# SGLang's default decode capture sizes: 1, 2, 4, 8, 12, 16, 24, 32, then every 8 up to 256.
DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 12, 16, 24, 32, *range(40, 257, 8))


def validate_buckets(buckets: Iterable[int]) -> tuple[int, ...]:
    """Return `buckets` as a tuple after checking it is a strictly increasing list of positive ints."""
    result = tuple(buckets)
    if not result:
        raise ValueError("buckets is empty; expected at least one positive int batch size")
    for b in result:
        # bool is an int subclass, but True as a batch size is always a mistake.
        if not isinstance(b, int) or isinstance(b, bool):
            raise ValueError(f"bucket {b!r} ({type(b).__name__}) is not an int; expected positive ints")
        if b <= 0:
            raise ValueError(f"bucket {b} is not positive; expected batch sizes >= 1")
    repeated = sorted(b for b, n in Counter(result).items() if n > 1)
    if repeated:
        raise ValueError(f"duplicate buckets {repeated} in {list(result)}; expected each size once")
    for i, (a, b) in enumerate(itertools.pairwise(result)):
        if a >= b:
            raise ValueError(
                f"buckets not strictly increasing: buckets[{i}]={a} >= buckets[{i + 1}]={b} in {list(result)}"
            )
    return result


def bucket_for(num_tokens: int, buckets: tuple[int, ...]) -> int | None:
    """Smallest bucket >= `num_tokens`, or None when `num_tokens` exceeds the largest bucket.

    `buckets` must already be validated (sorted); this runs on the replay path, so it
    does not re-check them. `num_tokens == 0` maps to the smallest bucket.
    """
    if num_tokens < 0:
        raise ValueError(f"num_tokens={num_tokens} is negative; expected >= 0")
    i = bisect.bisect_left(buckets, num_tokens)
    return buckets[i] if i < len(buckets) else None


def padding_rows(num_tokens: int, bucket: int) -> int:
    """Rows of padding when `num_tokens` rows are served by `bucket`."""
    if num_tokens < 0:
        raise ValueError(f"num_tokens={num_tokens} is negative; expected >= 0")
    pad = bucket - num_tokens
    if pad < 0:
        raise ValueError(f"bucket {bucket} is smaller than num_tokens={num_tokens}; expected bucket >= num_tokens")
    return pad
