"""Counter-based random bits: a pure function of (seed, stream, row, column).

Value tables draw their initial values and the stochastic rounding of bf16 row updates from
here, so the bits never depend on how a table is sharded, in which order rows are visited, on
how many threads or which device draws them, or whether a run was resumed: row r of a shard
gets the bits of row r of the whole table. The
mixer is a 32-bit integer hash (lowbias32's xor-shift-multiply shape, multipliers below 2^31)
computed on int64 tensors: products stay below 2^63, so ``(x * M) & MASK`` is exactly the
wrapping uint32 product a GPU kernel would compute. Vectorised torch ops, any device.
"""

from __future__ import annotations

import torch

MASK = 0xFFFFFFFF
_M1, _M2 = 0x7FEB352D, 0x2C1B3C6D
_GOLDEN = 0x9E3779B9  # column stride of the element counter
ROUND_STREAM = 1  # one stream per use
INIT_STREAM = 2


def mix32(x):
    """A bijective 32-bit hash of ``x`` in [0, 2^32) (an int, or an int64 tensor, in place)."""
    if isinstance(x, torch.Tensor):
        x ^= x >> 16
        x.mul_(_M1).bitwise_and_(MASK)
        x ^= x >> 15
        x.mul_(_M2).bitwise_and_(MASK)
        x ^= x >> 16
        return x
    x ^= x >> 16
    x = (x * _M1) & MASK
    x ^= x >> 15
    x = (x * _M2) & MASK
    return x ^ (x >> 16)


def stream_base(seed: int, stream: int, counter: int) -> int:
    """The 32-bit value every row key of ``(seed, stream, counter)`` is hashed from (the C++
    init takes it to key rows itself)."""
    return mix32(mix32(mix32(seed & MASK) ^ stream) ^ (counter & MASK))


def row_keys(seed: int, stream: int, counter: int, rows: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per global row id of ``rows`` [R] (int64), for ``(seed, stream, counter)``
    (``counter``: the optimizer step for rounding; the init takes counters 0 and 1)."""
    keys = rows.to(torch.int64) >> 32
    keys ^= stream_base(seed, stream, counter)
    mix32(keys)
    keys ^= rows & MASK
    return mix32(keys)


def element_bits(keys: torch.Tensor, col_start: int, n_cols: int) -> torch.Tensor:
    """32 random bits [R, n_cols] (int64) for columns ``col_start ...`` of the rows keyed by
    ``keys`` [R]: two hash rounds of ``key + column * golden``."""
    cols = torch.arange(col_start, col_start + n_cols, device=keys.device, dtype=torch.int64)
    bits = cols.mul_(_GOLDEN).add(keys.unsqueeze(1)).bitwise_and_(MASK)
    mix32(bits)
    bits ^= keys.unsqueeze(1)
    return mix32(bits)


def stochastic_round_bf16(x: torch.Tensor, keys: torch.Tensor, col_start: int) -> torch.Tensor:
    """fp32 ``x`` [R, d] (overwritten) rounded to bf16 up or down with probability given by its
    distance to each, so the rounding is unbiased: 16 random bits are added to the bits bf16
    drops, then those bits are truncated."""
    noise = element_bits(keys, col_start, x.shape[1]).bitwise_and_(0xFFFF).to(torch.int32)
    bits = x.view(torch.int32)
    bits.add_(noise).bitwise_and_(-0x10000)  # sign-magnitude: rounds the magnitude
    return x.to(torch.bfloat16)  # exact: the low 16 bits are zero


# Box-Muller in fp32, the same operations in the same order as ``normal_pair`` in
# csrc/rows.cpp: polynomials instead of libm (cephes' logf, sinf and cosf on [-pi/4, pi/4],
# ~1 ulp), products and sums each rounded on their own (the C++ is built without fused
# multiply-add), so the two give the same bits on any CPU or GPU.
_LOG_POLY = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
             1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
             3.3333331174e-1)
_SIN_POLY = (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1)
_COS_POLY = (2.443315711809948e-5, -1.388731625493765e-3, 4.166664568298827e-2)
_SQRT_HALF_BITS = 0x3F3504F3  # float32 sqrt(1/2)
_ONE_BITS = 0x3F800000


def _horner(x: torch.Tensor, coefficients: tuple[float, ...]) -> torch.Tensor:
    y = torch.full_like(x, coefficients[0])
    for c in coefficients[1:]:
        y = y.mul_(x).add_(c)
    return y


def _log(u: torch.Tensor) -> torch.Tensor:
    """ln(u) for fp32 u in [2^-24, 1]: u = 2^e * m with m in [sqrt(1/2), sqrt(2)) split from
    the bits, ln(m) by cephes' polynomial in m - 1, ln(2) * e in two parts."""
    i = u.view(torch.int32) + (_ONE_BITS - _SQRT_HALF_BITS)
    e = ((i >> 23) - 0x7F).float()
    x = ((i & 0x7FFFFF) + _SQRT_HALF_BITS).view(torch.float32) - 1.0
    z = x * x
    y = _horner(x, _LOG_POLY).mul_(x).mul_(z)
    y = y.add_(e * -2.12194440e-4).sub_(z * 0.5)
    return x.add_(y).add_(e.mul_(0.693359375))


def normal(seed: int, stream: int, rows: torch.Tensor, col_start: int, n_cols: int,
           std: float) -> torch.Tensor:
    """N(0, std^2) values, fp32 [R, n_cols], of columns ``col_start ...`` of global rows
    ``rows`` [R] (int64), on their device. Columns 2p and 2p+1 are one Box-Muller pair: the
    radius from the uniform of counter 2p, the angle from that of counter 2p+1, each
    ``mix32((counter * golden + k1) ^ k2)`` with the row's keys k1, k2 of counters 0 and 1
    (64 bits, so no two rows of a table are alike; one hash round, where the rounding's bits
    take two: this is the init's cost). Uniforms have 24 bits (the radius' one excludes 0):
    values reach 5.8 std."""
    k1 = row_keys(seed, stream, 0, rows).unsqueeze(1)
    k2 = row_keys(seed, stream, 1, rows).unsqueeze(1)
    first, end = col_start // 2, (col_start + n_cols + 1) // 2  # the pairs the columns touch
    counters = torch.arange(2 * first, 2 * end, device=rows.device, dtype=torch.int64)
    bits = counters.mul_(_GOLDEN).add(k1).bitwise_and_(MASK)
    bits ^= k2
    mix32(bits)
    radius_bits, angle_bits = bits[:, 0::2], bits[:, 1::2]
    u = ((radius_bits >> 8) + 1).float().mul_(2.0**-24)
    # torch's CPU sqrt (MKL) is an ulp off for ~0.7% of floats; a float's square root taken
    # in fp64 rounds to the correctly rounded fp32 one, as the C++ computes it
    radius = _log(u).mul_(-2.0 * std * std).double().sqrt_().float()
    quadrant = angle_bits >> 30
    x = ((angle_bits >> 8) & 0x3FFFFF).float().mul_(2.0**-22).sub_(0.5).mul_(torch.pi / 2)
    z = x * x
    sin = _horner(z, _SIN_POLY).mul_(z).mul_(x).add_(x)
    cos = _horner(z, _COS_POLY).mul_(z).mul_(z).sub_(z * 0.5).add_(1.0)
    # (cos, sin) of x + quadrant * pi/2: swapped in odd quadrants, signs as the quadrant has them
    odd = (quadrant & 1).bool()
    first_value = torch.where(odd, sin, cos)
    second_value = torch.where(odd, cos, sin)
    first_value = torch.where(((quadrant ^ (quadrant >> 1)) & 1).bool(), -first_value,
                              first_value)
    second_value = torch.where(quadrant >= 2, -second_value, second_value)
    pairs = torch.stack((first_value.mul_(radius), second_value.mul_(radius)), dim=2)
    offset = col_start - 2 * first
    return pairs.flatten(1)[:, offset : offset + n_cols]
