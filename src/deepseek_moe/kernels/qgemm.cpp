// Weight-only quantised matrix products for the CPU: y (M, N) = x (M, K) @ dequant(W (N, K))^T, fp32 in and out.
//
// Decode is memory-bound: every weight byte is read once per step, so the kernels read int8 / int4 codes,
// widen them to fp32 in registers and multiply-add against the activations; the dequantised matrix never
// exists in memory. Up to MB rows of x share each widened weight vector (batched decode, small expert groups).
// Parallel over output rows with OpenMP (the runtime torch itself loads, so one thread pool).
//
// The readable reference is deepseek_moe/kernels/quant_matmul.py (dequantise, then matmul); tests compare them.
// Built at run time by kernels/cpu_build.py with -march=native; without AVX-512 the plain loops are compiled.

#include <cstdint>
#include <cstring>
#include <omp.h>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define DSM_AVX512 1
#endif

namespace {

constexpr int MB = 4;  // rows of x per pass over a weight row

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu, bits;
    if (exp == 0) {
        if (man == 0) { bits = sign; }
        else { exp = 127 - 15 + 1; while (!(man & 0x400u)) { man <<= 1; --exp; } man &= 0x3ffu; bits = sign | (exp << 23) | (man << 13); }
    } else if (exp == 31) { bits = sign | 0x7f800000u | (man << 13); }
    else { bits = sign | ((exp + 127 - 15) << 23) | (man << 13); }
    float f; std::memcpy(&f, &bits, 4); return f;
#endif
}

// One output row n of int8 weights against mb (<= MB) rows of x.
template <int NB>
inline void row_int8(const float* x, int64_t ldx, int64_t K, const int8_t* w, float scale, float* out, int64_t ldo) {
    float acc_s[MB] = {0.f, 0.f, 0.f, 0.f};
    int64_t k = 0;
#ifdef DSM_AVX512
    __m512 acc[NB][2];
    for (int m = 0; m < NB; ++m) { acc[m][0] = _mm512_setzero_ps(); acc[m][1] = _mm512_setzero_ps(); }
    for (; k + 32 <= K; k += 32) {
        __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + k))));
        __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + k + 16))));
        for (int m = 0; m < NB; ++m) {
            acc[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * ldx + k), acc[m][0]);
            acc[m][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * ldx + k + 16), acc[m][1]);
        }
    }
    for (int m = 0; m < NB; ++m) acc_s[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
#endif
    for (; k < K; ++k)
        for (int m = 0; m < NB; ++m) acc_s[m] += float(w[k]) * x[m * ldx + k];
    for (int m = 0; m < NB; ++m) out[m * ldo] = acc_s[m] * scale;
}

// One output row of int4 weights, kernel layout: in each group of gs columns, byte j holds column j (low
// nibble) and column j + gs/2 (high nibble), each + 8. Scales fp16, one per group.
template <int NB>
inline void row_int4(const float* x, int64_t ldx, int64_t K, const uint8_t* w, const uint16_t* scale, int64_t gs,
                     float* out, int64_t ldo) {
    float acc_s[MB] = {0.f, 0.f, 0.f, 0.f};
    const int64_t half = gs / 2;
    const int64_t G = K / gs;
#ifdef DSM_AVX512
    if (half % 16 == 0) {
        __m512 acc[NB];
        for (int m = 0; m < NB; ++m) acc[m] = _mm512_setzero_ps();
        const __m128i low = _mm_set1_epi8(0x0f), eight = _mm_set1_epi8(8);
        for (int64_t g = 0; g < G; ++g) {
            const uint8_t* wg = w + g * half;
            const float* xg = x + g * gs;
            __m512 part[NB];
            for (int m = 0; m < NB; ++m) part[m] = _mm512_setzero_ps();
            for (int64_t j = 0; j < half; j += 16) {
                __m128i b = _mm_loadu_si128((const __m128i*)(wg + j));
                __m128i lo = _mm_sub_epi8(_mm_and_si128(b, low), eight);
                __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), low), eight);
                __m512 wl = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo));
                __m512 wh = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi));
                for (int m = 0; m < NB; ++m) {
                    part[m] = _mm512_fmadd_ps(wl, _mm512_loadu_ps(xg + m * ldx + j), part[m]);
                    part[m] = _mm512_fmadd_ps(wh, _mm512_loadu_ps(xg + m * ldx + half + j), part[m]);
                }
            }
            __m512 s = _mm512_set1_ps(half_to_float(scale[g]));
            for (int m = 0; m < NB; ++m) acc[m] = _mm512_fmadd_ps(part[m], s, acc[m]);
        }
        for (int m = 0; m < NB; ++m) out[m * ldo] = _mm512_reduce_add_ps(acc[m]);
        return;
    }
#endif
    for (int64_t g = 0; g < G; ++g) {
        float part[MB] = {0.f, 0.f, 0.f, 0.f};
        for (int64_t j = 0; j < half; ++j) {
            uint8_t b = w[g * half + j];
            float wl = float(int(b & 0x0f) - 8), wh = float(int(b >> 4) - 8);
            for (int m = 0; m < NB; ++m)
                part[m] += wl * x[m * ldx + g * gs + j] + wh * x[m * ldx + g * gs + half + j];
        }
        float s = half_to_float(scale[g]);
        for (int m = 0; m < NB; ++m) acc_s[m] += part[m] * s;
    }
    for (int m = 0; m < NB; ++m) out[m * ldo] = acc_s[m];
}

template <typename RowFn>
void over_rows(int64_t M, int64_t N, int n_threads, RowFn fn) {
    // Rows of W split over threads; every thread walks all of x's rows in blocks of MB so each weight row is
    // read from memory once per MB rows of x.
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        for (int64_t m0 = 0; m0 < M; m0 += MB) fn(n, m0, M - m0 < MB ? M - m0 : MB);
    }
}

}  // namespace

extern "C" {

int dsm_has_avx512() {
#ifdef DSM_AVX512
    return 1;
#else
    return 0;
#endif
}

// x (M, K) fp32 rows ldx apart; w (N, K) int8; scale (N,) fp32; y (M, N) fp32 rows ldy apart.
void dsm_qgemm_int8(const float* x, int64_t ldx, int64_t M, int64_t K, const int8_t* w, const float* scale,
                    int64_t N, float* y, int64_t ldy, int n_threads) {
    over_rows(M, N, n_threads, [&](int64_t n, int64_t m0, int64_t mb) {
        const float* xm = x + m0 * ldx;
        float* o = y + m0 * ldy + n;
        const int8_t* wn = w + n * K;
        switch (mb) {
            case 1: row_int8<1>(xm, ldx, K, wn, scale[n], o, ldy); break;
            case 2: row_int8<2>(xm, ldx, K, wn, scale[n], o, ldy); break;
            case 3: row_int8<3>(xm, ldx, K, wn, scale[n], o, ldy); break;
            default: row_int8<4>(xm, ldx, K, wn, scale[n], o, ldy); break;
        }
    });
}

// w (N, K/2) uint8 in the kernel layout; scale (N, K/gs) fp16 bits.
void dsm_qgemm_int4(const float* x, int64_t ldx, int64_t M, int64_t K, const uint8_t* w, const uint16_t* scale,
                    int64_t gs, int64_t N, float* y, int64_t ldy, int n_threads) {
    const int64_t G = K / gs;
    over_rows(M, N, n_threads, [&](int64_t n, int64_t m0, int64_t mb) {
        const float* xm = x + m0 * ldx;
        float* o = y + m0 * ldy + n;
        const uint8_t* wn = w + n * (K / 2);
        const uint16_t* sn = scale + n * G;
        switch (mb) {
            case 1: row_int4<1>(xm, ldx, K, wn, sn, gs, o, ldy); break;
            case 2: row_int4<2>(xm, ldx, K, wn, sn, gs, o, ldy); break;
            case 3: row_int4<3>(xm, ldx, K, wn, sn, gs, o, ldy); break;
            default: row_int4<4>(xm, ldx, K, wn, sn, gs, o, ldy); break;
        }
    });
}

}  // extern "C"
