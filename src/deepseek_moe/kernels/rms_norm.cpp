// RMSNorm over a few fp32 rows (a decode step's, a speculative verification's) in one call:
//   y[m, d] = x[m, d] * (1 / sqrt(mean_d(x[m, d]^2) + eps)) * w[d]
// in the order torch's rms_norm multiplies (x by the factor, then by the weight), the sum of squares in fp32
// lanes as its vectorised reduction keeps them (so the two differ by the summation order's rounding only).
// torch runs this as ~10 operations (pow, mean, add, rsqrt, two casts, two products...), ~15 us each call in a
// loop and ~50 us inside a decode step, where the kernels between them leave its code and data cold; a decode
// step of the mid-size model runs 25 of them. The readable reference is model/norm.py's formula.

#include <cmath>
#include <cstdint>

#include "rms_row.inc"

extern "C" void dsm_rms_norm(const float* x, int64_t ldx, int64_t M, int64_t D, const float* w, float eps,
                             float* y, int64_t ldy) {
    for (int64_t m = 0; m < M; ++m) rms_row(x + m * ldx, D, w, eps, y + m * ldy);
}
