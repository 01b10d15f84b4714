// Weight-only quantised matrix products for the CPU: y (M, N) = x (M, K) @ dequant(W (N, K))^T, fp32 in and out.
//
// Decode is memory-bound: every weight byte is read once per step, so the kernels read int8 / int4 codes,
// widen them to fp32 in registers and multiply-add against the activations; the dequantised matrix never
// exists in memory. Up to MB rows of x share each widened weight vector (batched decode, small expert groups).
// From dsm_get_strip_rows() rows of x on (training, prefill) the products are compute-bound instead: a panel of
// 16 rows of W is widened once into a small fp32 strip and a register tile runs over every row (run_strip).
// Parallel over output rows with OpenMP (the runtime torch itself loads, so one thread pool).
//
// One library serves every x86-64 CPU: the micro-tiles exist three times, as scalar loops (any CPU, any
// compiler flags), for AVX2+FMA+F16C and for AVX-512 (F+BW), the SIMD ones compiled through GCC/Clang
// `target` attributes rather than -march, so the file builds with the baseline -march=x86-64. The path is
// chosen once from CPUID (and the OS's XCR0: AVX-512 state must be enabled) and can be forced with
// dsm_set_isa (kernels/cpu_build.py: DEEPSEEK_MOE_KERNEL_ISA). Other architectures get the scalar loops.
//
// The readable reference is deepseek_moe/kernels/quant_layout.py (dequantise, then matmul); tests compare
// every path this CPU can run against it.
//
// Integer path (dsm_qgemm_q8, dsm_experts_q8): activations are first quantised to int8, per row and block of 32
// columns with an fp32 scale (llama.cpp's Q8_0 for activations), and each block is an exact int32 dot product
// against the int8 / int4 codes (qgemm_q8.inc: AVX2 vpmaddubsw, AVX512-VNNI vpdpbusd; scalar loops). Its
// readable twin is quant_matmul.quant_matmul_q8_reference.

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>
#include <omp.h>

#include "rms_row.inc"
// -DDSM_NO_SIMD builds what other architectures get (the tests use it).
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && !defined(DSM_NO_SIMD)
#define DSM_X86 1
#include <cpuid.h>
#include <immintrin.h>
#define DSM_AVX2 __attribute__((target("avx2,fma,f16c")))
#define DSM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define DSM_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#endif

namespace {

constexpr int NB = 4;  // rows of W per micro-tile (x is loaded once for all of them)
constexpr int MB = 4;  // rows of x per micro-tile (each widened weight vector is used MB times)
// The SIMD tiles prefetch, a cache line per row as they go, the rows of W the next tile reads (the next block
// of this thread under the static schedule, adjacent in memory): rows are 1-2 KB, too short for the hardware
// prefetcher to ramp up. 1.6x on a 1408 x 2048 decode matmul (int8 and int4, AVX-512 and AVX2, 1 thread).

// IEEE half -> float without F16C (the scalar path must not need it).
inline float half_to_float(uint16_t h) {
    uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu, bits;
    if (exp == 0) {
        if (man == 0) { bits = sign; }
        else { exp = 127 - 15 + 1; while (!(man & 0x400u)) { man <<= 1; --exp; } man &= 0x3ffu; bits = sign | (exp << 23) | (man << 13); }
    } else if (exp == 31) { bits = sign | 0x7f800000u | (man << 13); }
    else { bits = sign | ((exp + 127 - 15) << 23) | (man << 13); }
    float f; std::memcpy(&f, &bits, 4); return f;
}

// Arguments shared by the micro-tiles: x (M, K) rows ldx apart, y (M, N) rows ldy apart.
struct Problem {
    const float* x; int64_t ldx; int64_t M; int64_t K;
    const void* w; const void* scale; int64_t gs; int64_t N;
    float* y; int64_t ldy;
};

// Activations quantised to int8: codes (M, ldq) (each row zero-padded to nb blocks of 32), fp32 scales (M, nb).
struct QAct { const int8_t* q; const float* d; int64_t ldq; int64_t nb; };

constexpr int NBQ = 8;  // weight rows per integer micro-tile, at most (the fused gate/up tile: 4 of w1, 4 of w3)

// An integer micro-tile: nn weight rows given by pointer (rows of one matrix, or of w1 and w3 together), nm
// activation rows from m0. Row i: codes w[i], scale s[i] (int8: its fp32 scale; int4: its fp16 group scales);
// next[i] is prefetched (the row the next tile reads); y[i][j * ldy] receives row m0 + j.
struct QTile {
    const QAct* a; int64_t m0; int64_t K; int64_t gs;
    const uint8_t* w[NBQ]; const void* s[NBQ]; const char* next[NBQ];
    float* y[NBQ]; int64_t ldy;
};

// Per row and block of 32 columns: d = max|x| / 127, q = round-half-even(x * (1/d)) clamped to [-127, 127]
// (no -128: the sign trick needs |q| to fit a signed byte). The same IEEE operations as the PyTorch twin, so
// the codes are equal, not close. One loop for every ISA: it is O(M K) against the matmul's O(M K N).
void quantize_row(const float* xr, int64_t K, int8_t* qr, float* d, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b) {
        const int64_t lo = 32 * b, hi = lo + 32 < K ? lo + 32 : K;
        float amax = 0.0f;
        bool nan = false;
        for (int64_t k = lo; k < hi; ++k) { amax = std::fmax(amax, std::fabs(xr[k])); nan |= std::isnan(xr[k]); }
        if (nan) {  // a NaN block: scale NaN, codes 0, so the NaN reaches every output as in the float product
            d[b] = std::numeric_limits<float>::quiet_NaN();
            for (int64_t k = lo; k < lo + 32; ++k) qr[k] = 0;
            continue;
        }
        const float db = amax / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
        d[b] = db;
        for (int64_t k = lo; k < hi; ++k) {
            const float v = std::nearbyint(xr[k] * id);  // the default rounding mode: half to even
            qr[k] = int8_t(v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v));
        }
        for (int64_t k = hi; k < lo + 32; ++k) qr[k] = 0;
    }
}

// Each micro-tile computes y[m0:m0+nm, n0:n0+nn].
//  int8: W (N, K) int8 codes, per-row fp32 scales (N,).
//  int4: W in the kernel layout (in each group of gs columns, byte j = column j in the low nibble, column
//        j + gs/2 in the high one, each + 8), fp16 group scales (N, K/gs).

namespace scalar {

template <int nn, int nm>
void tile_int8(const Problem& p, int64_t n0, int64_t m0) {
    const int8_t* w = static_cast<const int8_t*>(p.w) + n0 * p.K;
    const float* scale = static_cast<const float*>(p.scale) + n0;
    const float* x = p.x + m0 * p.ldx;
    float sums[nn][nm] = {};
    for (int64_t k = 0; k < p.K; ++k)
        for (int i = 0; i < nn; ++i)
            for (int j = 0; j < nm; ++j) sums[i][j] += float(w[i * p.K + k]) * x[j * p.ldx + k];
    for (int i = 0; i < nn; ++i)
        for (int j = 0; j < nm; ++j) p.y[(m0 + j) * p.ldy + n0 + i] = sums[i][j] * scale[i];
}

template <int nn, int nm>
void tile_int4(const Problem& p, int64_t n0, int64_t m0) {
    const int64_t half = p.gs / 2, G = p.K / p.gs, row_bytes = p.K / 2;
    const uint8_t* w = static_cast<const uint8_t*>(p.w) + n0 * row_bytes;
    const uint16_t* scale = static_cast<const uint16_t*>(p.scale) + n0 * G;
    const float* x = p.x + m0 * p.ldx;
    float sums[nn][nm] = {};
    for (int i = 0; i < nn; ++i)
        for (int64_t g = 0; g < G; ++g) {
            const float s = half_to_float(scale[i * G + g]);
            for (int64_t jj = 0; jj < half; ++jj) {
                const uint8_t b = w[i * row_bytes + g * half + jj];
                const float wl = float(int(b & 0x0f) - 8) * s, wh = float(int(b >> 4) - 8) * s;
                for (int j = 0; j < nm; ++j)
                    sums[i][j] += wl * x[j * p.ldx + g * p.gs + jj] + wh * x[j * p.ldx + g * p.gs + half + jj];
            }
        }
    for (int i = 0; i < nn; ++i)
        for (int j = 0; j < nm; ++j) p.y[(m0 + j) * p.ldy + n0 + i] = sums[i][j];
}

// Column k of an int4 row in the kernel layout, as a signed code.
inline int int4_code(const uint8_t* row, int64_t gs, int64_t k) {
    const int64_t g = k / gs, c = k % gs, half = gs / 2;
    const uint8_t b = row[g * half + c % half];
    return int(c < half ? (b & 0x0f) : (b >> 4)) - 8;
}

template <int BITS, int nn, int nm>
void tile_q8(const QTile& t) {
    const int64_t nb = (t.K + 31) / 32;
    for (int i = 0; i < nn; ++i)
        for (int j = 0; j < nm; ++j) {
            const int8_t* xq = t.a->q + (t.m0 + j) * t.a->ldq;
            const float* xd = t.a->d + (t.m0 + j) * t.a->nb;
            float sum = 0.0f;
            for (int64_t b = 0; b < nb; ++b) {
                int32_t isum = 0;
                for (int64_t k = 32 * b; k < 32 * b + 32 && k < t.K; ++k)
                    isum += int32_t(xq[k]) * (BITS == 8 ? int32_t(reinterpret_cast<const int8_t*>(t.w[i])[k])
                                                        : int4_code(t.w[i], t.gs, k));
                float f = xd[b];
                if (BITS == 4) f *= half_to_float(static_cast<const uint16_t*>(t.s[i])[32 * b / t.gs]);
                sum += f * float(isum);
            }
            if (BITS == 8) sum *= *static_cast<const float*>(t.s[i]);
            t.y[i][j * t.ldy] = sum;
        }
}

}  // namespace scalar

#ifdef DSM_X86
// The avx2 and avx512 tiles are one algorithm at two vector widths, written twice on purpose: a body shared
// through templates would be compiled without the target attribute, and GCC refuses to inline intrinsics there.
namespace avx2 {

DSM_AVX2 inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// One row of x (decode): the tile's rows one after another, each a single sequential stream with four
// accumulators, instead of nn rows side by side. Side by side, a tile reads nn 1 KB streams at once, which the
// hardware prefetcher follows poorly: over 704 x 1024 int8 matrices streaming from memory (AMD EPYC, AVX2, a
// standalone harness) 14-16 GB/s at 2 threads against 18.5 one row at a time and ~23 for a plain sum of the bytes.
DSM_AVX2 inline __m256 widen8(const int8_t* w) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
}

DSM_AVX2 void row_int8(const int8_t* w, const float* x, int64_t K, float scale, float* y) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        a0 = _mm256_fmadd_ps(widen8(w + k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(widen8(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(widen8(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(widen8(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(widen8(w + k), _mm256_loadu_ps(x + k), a0);
    float sum = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; ++k) sum += float(w[k]) * x[k];
    *y = sum * scale;
}

template <int nn, int nm>
DSM_AVX2 void tile_int8(const Problem& p, int64_t n0, int64_t m0) {
    const int8_t* w = static_cast<const int8_t*>(p.w) + n0 * p.K;
    const float* scale = static_cast<const float*>(p.scale) + n0;
    const float* x = p.x + m0 * p.ldx;
    if constexpr (nm == 1) {
        for (int i = 0; i < nn; ++i) row_int8(w + i * p.K, x, p.K, scale[i], p.y + m0 * p.ldy + n0 + i);
        return;
    }
    __m256 acc[nn][nm];
    for (int i = 0; i < nn; ++i) for (int j = 0; j < nm; ++j) acc[i][j] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= p.K; k += 8) {
        __m256 xv[nm];
        for (int j = 0; j < nm; ++j) xv[j] = _mm256_loadu_ps(x + j * p.ldx + k);
        if ((k & 63) == 0)
            for (int i = 0; i < nn; ++i) _mm_prefetch((const char*)(w + (i + nn) * p.K + k), _MM_HINT_T0);
        for (int i = 0; i < nn; ++i) {
            __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w + i * p.K + k))));
            for (int j = 0; j < nm; ++j) acc[i][j] = _mm256_fmadd_ps(wv, xv[j], acc[i][j]);
        }
    }
    float sums[nn][nm];
    for (int i = 0; i < nn; ++i) for (int j = 0; j < nm; ++j) sums[i][j] = hsum(acc[i][j]);
    for (; k < p.K; ++k)
        for (int i = 0; i < nn; ++i)
            for (int j = 0; j < nm; ++j) sums[i][j] += float(w[i * p.K + k]) * x[j * p.ldx + k];
    for (int i = 0; i < nn; ++i)
        for (int j = 0; j < nm; ++j) p.y[(m0 + j) * p.ldy + n0 + i] = sums[i][j] * scale[i];
}

// 8 bytes of a row give 8 low and 8 high nibbles; (code - 8) * s = code * s - 8s is one FMA after the
// convert. Needs gs a multiple of 16.
template <int nn, int nm>
DSM_AVX2 void tile_int4(const Problem& p, int64_t n0, int64_t m0) {
    const int64_t half = p.gs / 2, G = p.K / p.gs, row_bytes = p.K / 2;
    const uint8_t* w = static_cast<const uint8_t*>(p.w) + n0 * row_bytes;
    const uint16_t* scale = static_cast<const uint16_t*>(p.scale) + n0 * G;
    const float* x = p.x + m0 * p.ldx;
    const __m256i low4 = _mm256_set1_epi32(0x0f);
    __m256 acc[nn][nm];
    for (int i = 0; i < nn; ++i) for (int j = 0; j < nm; ++j) acc[i][j] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        __m256 s[nn], off[nn];
        for (int i = 0; i < nn; ++i) {
            const float si = _cvtsh_ss(scale[i * G + g]);
            s[i] = _mm256_set1_ps(si);
            off[i] = _mm256_set1_ps(-8.0f * si);
        }
        for (int64_t jj = 0; jj < half; jj += 8) {
            const int64_t k_lo = g * p.gs + jj, k_hi = k_lo + half;
            __m256 xl[nm], xh[nm];
            for (int j = 0; j < nm; ++j) {
                xl[j] = _mm256_loadu_ps(x + j * p.ldx + k_lo);
                xh[j] = _mm256_loadu_ps(x + j * p.ldx + k_hi);
            }
            if (((g * half + jj) & 63) == 0)
                for (int i = 0; i < nn; ++i) _mm_prefetch((const char*)(w + (i + nn) * row_bytes + g * half + jj), _MM_HINT_T0);
            for (int i = 0; i < nn; ++i) {
                __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(w + i * row_bytes + g * half + jj)));
                __m256 wl = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, low4)), s[i], off[i]);
                __m256 wh = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), s[i], off[i]);
                for (int j = 0; j < nm; ++j) {
                    acc[i][j] = _mm256_fmadd_ps(wl, xl[j], acc[i][j]);
                    acc[i][j] = _mm256_fmadd_ps(wh, xh[j], acc[i][j]);
                }
            }
        }
    }
    for (int i = 0; i < nn; ++i)
        for (int j = 0; j < nm; ++j) p.y[(m0 + j) * p.ldy + n0 + i] = hsum(acc[i][j]);
}

#define DSM_Q8_TARGET DSM_AVX2
#define DSM_Q8_DOT(u, s) _mm256_madd_epi16(_mm256_maddubs_epi16((u), (s)), _mm256_set1_epi16(1))
#include "qgemm_q8.inc"
#undef DSM_Q8_TARGET
#undef DSM_Q8_DOT

}  // namespace avx2

namespace avx512 {

template <int nn, int nm>
DSM_AVX512 void tile_int8(const Problem& p, int64_t n0, int64_t m0) {
    const int8_t* w = static_cast<const int8_t*>(p.w) + n0 * p.K;
    const float* scale = static_cast<const float*>(p.scale) + n0;
    const float* x = p.x + m0 * p.ldx;
    __m512 acc[nn][nm];
    for (int i = 0; i < nn; ++i) for (int j = 0; j < nm; ++j) acc[i][j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= p.K; k += 16) {
        __m512 xv[nm];
        for (int j = 0; j < nm; ++j) xv[j] = _mm512_loadu_ps(x + j * p.ldx + k);
        if ((k & 63) == 0)
            for (int i = 0; i < nn; ++i) _mm_prefetch((const char*)(w + (i + nn) * p.K + k), _MM_HINT_T0);
        for (int i = 0; i < nn; ++i) {
            __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + i * p.K + k))));
            for (int j = 0; j < nm; ++j) acc[i][j] = _mm512_fmadd_ps(wv, xv[j], acc[i][j]);
        }
    }
    float sums[nn][nm];
    for (int i = 0; i < nn; ++i) for (int j = 0; j < nm; ++j) sums[i][j] = _mm512_reduce_add_ps(acc[i][j]);
    for (; k < p.K; ++k)
        for (int i = 0; i < nn; ++i)
            for (int j = 0; j < nm; ++j) sums[i][j] += float(w[i * p.K + k]) * x[j * p.ldx + k];
    for (int i = 0; i < nn; ++i)
        for (int j = 0; j < nm; ++j) p.y[(m0 + j) * p.ldy + n0 + i] = sums[i][j] * scale[i];
}

// Decoding is a table lookup: per row and group a 16-entry table holds (code - 8) * scale, and vpermps indexes
// it with the nibbles (it reads only the low 4 bits of each lane), so a weight costs no convert, subtract or
// multiply. Needs gs a multiple of 32.
template <int nn, int nm>
DSM_AVX512 void tile_int4(const Problem& p, int64_t n0, int64_t m0) {
    const int64_t half = p.gs / 2, G = p.K / p.gs, row_bytes = p.K / 2;
    const uint8_t* w = static_cast<const uint8_t*>(p.w) + n0 * row_bytes;
    const uint16_t* scale = static_cast<const uint16_t*>(p.scale) + n0 * G;
    const float* x = p.x + m0 * p.ldx;
    __m512 acc[nn][nm];
    for (int i = 0; i < nn; ++i) for (int j = 0; j < nm; ++j) acc[i][j] = _mm512_setzero_ps();
    const __m512 codes = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    for (int64_t g = 0; g < G; ++g) {
        __m512 table[nn];
        for (int i = 0; i < nn; ++i) table[i] = _mm512_mul_ps(codes, _mm512_set1_ps(_cvtsh_ss(scale[i * G + g])));
        for (int64_t jj = 0; jj < half; jj += 16) {
            const int64_t k_lo = g * p.gs + jj, k_hi = k_lo + half;
            __m512 xl[nm], xh[nm];
            for (int j = 0; j < nm; ++j) {
                xl[j] = _mm512_loadu_ps(x + j * p.ldx + k_lo);
                xh[j] = _mm512_loadu_ps(x + j * p.ldx + k_hi);
            }
            if (((g * half + jj) & 63) == 0)
                for (int i = 0; i < nn; ++i) _mm_prefetch((const char*)(w + (i + nn) * row_bytes + g * half + jj), _MM_HINT_T0);
            for (int i = 0; i < nn; ++i) {
                __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w + i * row_bytes + g * half + jj)));
                __m512 wl = _mm512_permutexvar_ps(b, table[i]);
                __m512 wh = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table[i]);
                for (int j = 0; j < nm; ++j) {
                    acc[i][j] = _mm512_fmadd_ps(wl, xl[j], acc[i][j]);
                    acc[i][j] = _mm512_fmadd_ps(wh, xh[j], acc[i][j]);
                }
            }
        }
    }
    for (int i = 0; i < nn; ++i)
        for (int j = 0; j < nm; ++j) p.y[(m0 + j) * p.ldy + n0 + i] = _mm512_reduce_add_ps(acc[i][j]);
}

// AVX512-VNNI: the AVX2 integer tiles with vpdpbusd for the two-instruction dot (ymm registers, so the float
// accumulation is the AVX2 path's, instruction for instruction). Never run on the AVX2-only CI machine.
namespace vnni {
#define DSM_Q8_TARGET DSM_VNNI
#define DSM_Q8_DOT(u, s) _mm256_dpbusd_epi32(_mm256_setzero_si256(), (u), (s))
#include "qgemm_q8.inc"
#undef DSM_Q8_TARGET
#undef DSM_Q8_DOT
}  // namespace vnni

}  // namespace avx512
#endif  // DSM_X86

// ----------------------------------------------------------------------------------------------------------
// Dispatch: one table of micro-tiles per instruction set, indexed [nn - 1][nm - 1].

using TileFn = void (*)(const Problem&, int64_t, int64_t);
using TileTable = TileFn[NB][MB];

using QTileFn = void (*)(const QTile&);
using QTileTable = QTileFn[NBQ][MB];

// fp32-activation tiles (int8, int4 weights), then integer tiles (int8, int4 weights).
struct Kernels { TileTable int8; TileTable int4; QTileTable q8_int8; QTileTable q8_int4; };

#define DSM_ROW(ns, fn, i) {&ns::fn<i, 1>, &ns::fn<i, 2>, &ns::fn<i, 3>, &ns::fn<i, 4>}
#define DSM_TABLE(ns, fn) {DSM_ROW(ns, fn, 1), DSM_ROW(ns, fn, 2), DSM_ROW(ns, fn, 3), DSM_ROW(ns, fn, 4)}
#define DSM_QROW(ns, b, i) {&ns::tile_q8<b, i, 1>, &ns::tile_q8<b, i, 2>, &ns::tile_q8<b, i, 3>, &ns::tile_q8<b, i, 4>}
#define DSM_QTABLE(ns, b) {DSM_QROW(ns, b, 1), DSM_QROW(ns, b, 2), DSM_QROW(ns, b, 3), DSM_QROW(ns, b, 4), \
                           DSM_QROW(ns, b, 5), DSM_QROW(ns, b, 6), DSM_QROW(ns, b, 7), DSM_QROW(ns, b, 8)}
#define DSM_KERNELS(f32ns, q8ns) \
    {DSM_TABLE(f32ns, tile_int8), DSM_TABLE(f32ns, tile_int4), DSM_QTABLE(q8ns, 8), DSM_QTABLE(q8ns, 4)}

// avx512 (F+BW without VNNI) runs the AVX2 integer tiles; avx512vnni adds vpdpbusd to avx512.
enum Isa { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_AVX512VNNI = 3, N_ISA = 4 };

const Kernels KERNELS[N_ISA] = {
    DSM_KERNELS(scalar, scalar),
#ifdef DSM_X86
    DSM_KERNELS(avx2, avx2),
    DSM_KERNELS(avx512, avx2),
    DSM_KERNELS(avx512, avx512::vnni),
#else  // never selected: supported() says no
    DSM_KERNELS(scalar, scalar),
    DSM_KERNELS(scalar, scalar),
    DSM_KERNELS(scalar, scalar),
#endif
};

// What this CPU and OS can run, from CPUID and XGETBV (the OS must save the YMM / ZMM state on context switch).
bool supported(int isa) {
    if (isa == ISA_SCALAR) return true;
#ifdef DSM_X86
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
    const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28), f16c = c & (1u << 29);
    if (!(osxsave && avx && fma && f16c)) return false;
    unsigned xcr0_lo, xcr0_hi;
    __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    if ((xcr0_lo & 0x6u) != 0x6u) return false;  // XMM and YMM state
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool avx2 = b & (1u << 5), avx512f = b & (1u << 16), avx512dq = b & (1u << 17),
               avx512bw = b & (1u << 30), avx512vl = b & (1u << 31);
    if (isa == ISA_AVX2) return avx2;
    const bool avx512 = avx2 && avx512f && avx512dq && avx512bw && avx512vl && (xcr0_lo & 0xe0u) == 0xe0u;  // opmask, ZMM
    if (isa == ISA_AVX512) return avx512;
    if (isa == ISA_AVX512VNNI) return avx512 && (c & (1u << 11));  // CPUID.7.0:ECX.AVX512_VNNI
#endif
    return false;
}

int best_isa() {
    for (int isa = N_ISA - 1; isa > 0; --isa)
        if (supported(isa)) return isa;
    return ISA_SCALAR;
}

std::atomic<int> g_isa{-1};

const Kernels& kernels() {
    int isa = g_isa.load(std::memory_order_relaxed);
    if (isa < 0) {
        isa = best_isa();
        g_isa.store(isa, std::memory_order_relaxed);
    }
    return KERNELS[isa];
}

constexpr int64_t MCHUNK = 64;  // rows of x kept hot (in L2) while every weight row streams past them

void tile_rows(const TileTable& tiles, const Problem& p, int64_t n0, int64_t m_lo, int64_t m_hi) {
    const int nn = int(p.N - n0 < NB ? p.N - n0 : NB);
    for (int64_t m0 = m_lo; m0 < m_hi; m0 += MB) {
        const int nm = int(m_hi - m0 < MB ? m_hi - m0 : MB);
        tiles[nn - 1][nm - 1](p, n0, m0);
    }
}

void run(const TileTable& tiles, const Problem& p, int n_threads) {
    // Blocks of NB rows of W over threads; each block walks a chunk of x in blocks of MB rows. W is streamed
    // from memory once per MCHUNK rows of x (once, for decode), x stays in cache.
    const int64_t n_blocks = (p.N + NB - 1) / NB;
    for (int64_t m_lo = 0; m_lo < p.M; m_lo += MCHUNK) {
        const int64_t m_hi = m_lo + MCHUNK < p.M ? m_lo + MCHUNK : p.M;
#pragma omp parallel for num_threads(n_threads) schedule(static)
        for (int64_t b = 0; b < n_blocks; ++b) tile_rows(tiles, p, b * NB, m_lo, m_hi);
    }
}

// ----------------------------------------------------------------------------------------------------------
// Integer path drivers

int64_t row_bytes(int bits, int64_t K) { return bits == 8 ? K : K / 2; }

// Rows n0 .. n0+nn of one weight matrix as tile rows at .. at+nn, row i writing to y0 + i.
void set_rows(QTile& t, int at, int bits, const void* w, const void* scale, int64_t n0, int nn, float* y0) {
    const int64_t rb = row_bytes(bits, t.K);
    for (int i = 0; i < nn; ++i) {
        const int64_t n = n0 + i;
        t.w[at + i] = static_cast<const uint8_t*>(w) + n * rb;
        t.s[at + i] = bits == 8 ? static_cast<const void*>(static_cast<const float*>(scale) + n)
                                : static_cast<const void*>(static_cast<const uint16_t*>(scale) + n * (t.K / t.gs));
        t.next[at + i] = reinterpret_cast<const char*>(t.w[at + i] + nn * rb);
        t.y[at + i] = y0 + i;
    }
}

// As run(): blocks of NB weight rows over threads, each walking a chunk of MCHUNK activation rows.
void run_q8(const QTileTable& tiles, const QAct& a, int64_t M, int64_t K, int bits, const void* w,
            const void* scale, int64_t gs, int64_t N, float* y, int64_t ldy, int n_threads) {
    const int64_t n_blocks = (N + NB - 1) / NB;
    for (int64_t m_lo = 0; m_lo < M; m_lo += MCHUNK) {
        const int64_t m_hi = m_lo + MCHUNK < M ? m_lo + MCHUNK : M;
#pragma omp parallel for num_threads(n_threads) schedule(static)
        for (int64_t b = 0; b < n_blocks; ++b) {
            const int64_t n0 = b * NB;
            const int nn = int(N - n0 < NB ? N - n0 : NB);
            for (int64_t m0 = m_lo; m0 < m_hi; m0 += MB) {
                const int nm = int(m_hi - m0 < MB ? m_hi - m0 : MB);
                QTile t{&a, m0, K, gs, {}, {}, {}, {}, ldy};
                set_rows(t, 0, bits, w, scale, n0, nn, y + m0 * ldy + n0);
                tiles[nn - 1][nm - 1](t);
            }
        }
    }
}

// ----------------------------------------------------------------------------------------------------------
// The transposed product, for the backward of a frozen int8 layer (quant/grad.py): dx (M, K) = dy (M, N) @ W
// = (dy * scale) (M, N) @ Q (N, K). The forward tiles walk rows of W against rows of x; here each row of Q is
// spread over every column of dx, so the work is split over columns of K instead (no sum crosses threads):
// a work item is one group's (expert's) panel of TPANEL columns. Its codes are widened TKB columns at a time
// into an fp32 strip (N, TKB) that stays in L2, once for all rows of dy, and a 6 x 16 register tile runs down
// the strip per TMB rows: reading 16 strided bytes of Q per row of a tile instead cost as much as the FMAs.
// Twin: kernels/quant_transposed.py (input_grad_reference, the tiled dequantise-then-matmul code).

constexpr int TMB = 6;              // rows of dy per micro-tile: 6 x 2 ymm accumulators
constexpr int TKB = 16;             // columns of dx per micro-tile (and per widened strip)
constexpr int64_t TPANEL = 64;      // columns per work item: one cache line of each row of codes

// One micro-tile: rows ds[j * ldd + n] (dy * scale) against strip[n * TKB + c] (widened codes, zero past nk),
// written to dx[j * ldx + c] for c < nk.
struct TTile { const float* ds; int64_t ldd; int64_t N; const float* strip; float* dx; int64_t ldx; int64_t nk; };

namespace scalar {

void widen_int8(const int8_t* w, int64_t K, int64_t N, int64_t nk, float* strip) {  // w at column k0
    for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < TKB; ++c) strip[n * TKB + c] = c < nk ? float(w[n * K + c]) : 0.0f;
}

template <int nm>
void ttile(const TTile& t) {
    float acc[nm][TKB] = {};
    for (int64_t n = 0; n < t.N; ++n)
        for (int j = 0; j < nm; ++j) {
            const float d = t.ds[j * t.ldd + n];
            for (int c = 0; c < TKB; ++c) acc[j][c] += d * t.strip[n * TKB + c];
        }
    for (int j = 0; j < nm; ++j)
        for (int64_t c = 0; c < t.nk; ++c) t.dx[j * t.ldx + c] = acc[j][c];
}

// The forward's strip (see run_strip): rows n0 .. n0 + nn of p's W dequantised and transposed,
// strip[k * TKB + c] = W[n0 + c][k] (code times scale), zero for c >= nn.
void widen_rows_int8(const Problem& p, int64_t n0, int64_t nn, float* strip) {
    const int8_t* w = static_cast<const int8_t*>(p.w) + n0 * p.K;
    const float* scale = static_cast<const float*>(p.scale) + n0;
    for (int64_t k = 0; k < p.K; ++k)
        for (int64_t c = 0; c < TKB; ++c) strip[k * TKB + c] = c < nn ? float(w[c * p.K + k]) * scale[c] : 0.0f;
}

void widen_rows_int4(const Problem& p, int64_t n0, int64_t nn, float* strip) {
    const int64_t G = p.K / p.gs, rb = p.K / 2;
    const uint8_t* w = static_cast<const uint8_t*>(p.w) + n0 * rb;
    const uint16_t* scale = static_cast<const uint16_t*>(p.scale) + n0 * G;
    for (int64_t k = 0; k < p.K; ++k)
        for (int64_t c = 0; c < TKB; ++c)
            strip[k * TKB + c] = c < nn ? float(int4_code(w + c * rb, p.gs, k)) * half_to_float(scale[c * G + k / p.gs])
                                        : 0.0f;
}

}  // namespace scalar

#ifdef DSM_X86
namespace avx2 {

DSM_AVX2 void widen_int8(const int8_t* w, int64_t K, int64_t N, int64_t nk, float* strip) {
    if (nk < TKB) { scalar::widen_int8(w, K, N, nk, strip); return; }  // the last columns of an odd K
    for (int64_t n = 0; n < N; ++n) {
        const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + n * K));
        _mm256_storeu_ps(strip + n * TKB, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c)));
        _mm256_storeu_ps(strip + n * TKB + 8, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(c, c))));
    }
}

template <int nm>
DSM_AVX2 void ttile(const TTile& t) {
    // Twelve named accumulators, not an array: GCC kept an array's copy on the stack, stored every iteration,
    // which halved the speed. Rows past nm are compiled out.
    const float* ds = t.ds;
    const float* b = t.strip;
    const int64_t ldd = t.ldd, N = t.N;
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
           c40 = c00, c41 = c00, c50 = c00, c51 = c00;
#define DSM_TROW(j, lo, hi)                                                  \
    if constexpr (nm > j) {                                                  \
        const __m256 d = _mm256_broadcast_ss(ds + j * ldd + n);              \
        lo = _mm256_fmadd_ps(d, b0, lo);                                     \
        hi = _mm256_fmadd_ps(d, b1, hi);                                     \
    }
    for (int64_t n = 0; n < N; ++n, b += TKB) {
        const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
        DSM_TROW(0, c00, c01) DSM_TROW(1, c10, c11) DSM_TROW(2, c20, c21)
        DSM_TROW(3, c30, c31) DSM_TROW(4, c40, c41) DSM_TROW(5, c50, c51)
    }
#undef DSM_TROW
    alignas(32) float out[TMB][TKB];
    const __m256 acc[TMB][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
    for (int j = 0; j < nm; ++j) {
        _mm256_store_ps(out[j], acc[j][0]);
        _mm256_store_ps(out[j] + 8, acc[j][1]);
        std::memcpy(t.dx + j * t.ldx, out[j], size_t(t.nk) * sizeof(float));
    }
}

// 8 columns of 8 rows, widened and scaled (one vector per row), become 8 vectors of one column each.
DSM_AVX2 inline void transpose8(__m256 r[8]) {
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xee);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xee);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xee);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xee);
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20); r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20); r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31); r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31); r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

DSM_AVX2 void widen_rows_int8(const Problem& p, int64_t n0, int64_t nn, float* strip) {
    if (nn < TKB) { scalar::widen_rows_int8(p, n0, nn, strip); return; }  // the last rows of an odd N
    const int8_t* w = static_cast<const int8_t*>(p.w) + n0 * p.K;
    const float* scale = static_cast<const float*>(p.scale) + n0;
    const int64_t K = p.K;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8)
        for (int h = 0; h < TKB; h += 8) {  // rows h .. h + 7 fill columns h .. h + 7 of 8 strip rows
            __m256 r[8];
            for (int i = 0; i < 8; ++i) {
                const __m128i c = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + (h + i) * K + k));
                r[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c)), _mm256_broadcast_ss(scale + h + i));
            }
            transpose8(r);
            for (int i = 0; i < 8; ++i) _mm256_storeu_ps(strip + (k + i) * TKB + h, r[i]);
        }
    for (; k < K; ++k)
        for (int c = 0; c < TKB; ++c) strip[k * TKB + c] = float(w[c * K + k]) * scale[c];
}

// int4 (kernel layout, fp16 group scales; gs a multiple of 16): 8 bytes of a row are 8 columns of a group's low
// half (low nibbles) and the same 8 of its high half (high nibbles); (code - 8) * s is one FMA, as in tile_int4.
DSM_AVX2 void widen_rows_int4(const Problem& p, int64_t n0, int64_t nn, float* strip) {
    if (nn < TKB) { scalar::widen_rows_int4(p, n0, nn, strip); return; }
    const int64_t G = p.K / p.gs, rb = p.K / 2, half = p.gs / 2;
    const uint8_t* w = static_cast<const uint8_t*>(p.w) + n0 * rb;
    const uint16_t* scale = static_cast<const uint16_t*>(p.scale) + n0 * G;
    const __m256i low4 = _mm256_set1_epi32(0x0f);
    for (int64_t g = 0; g < G; ++g) {
        float s[TKB], off[TKB];
        for (int c = 0; c < TKB; ++c) { s[c] = _cvtsh_ss(scale[c * G + g]); off[c] = -8.0f * s[c]; }
        for (int64_t jj = 0; jj < half; jj += 8)
            for (int hi = 0; hi < 2; ++hi) {  // the low nibbles: columns g * gs + jj ..; the high: + half
                const int64_t k = g * p.gs + hi * half + jj;
                for (int h = 0; h < TKB; h += 8) {
                    __m256 r[8];
                    for (int i = 0; i < 8; ++i) {
                        const __m256i b = _mm256_cvtepu8_epi32(
                            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + (h + i) * rb + g * half + jj)));
                        const __m256i code = hi ? _mm256_srli_epi32(b, 4) : _mm256_and_si256(b, low4);
                        r[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(code), _mm256_broadcast_ss(s + h + i),
                                               _mm256_broadcast_ss(off + h + i));
                    }
                    transpose8(r);
                    for (int i = 0; i < 8; ++i) _mm256_storeu_ps(strip + (k + i) * TKB + h, r[i]);
                }
            }
    }
}

}  // namespace avx2
#endif  // DSM_X86

using WidenFn = void (*)(const int8_t*, int64_t, int64_t, int64_t, float*);
using WidenRowsFn = void (*)(const Problem&, int64_t, int64_t, float*);
using TTileFn = void (*)(const TTile&);
struct TKernels { WidenFn widen; WidenRowsFn widen_rows8; WidenRowsFn widen_rows4; TTileFn tiles[TMB]; };
#define DSM_TKERNELS(ns) {&ns::widen_int8, &ns::widen_rows_int8, &ns::widen_rows_int4,                        \
                          {&ns::ttile<1>, &ns::ttile<2>, &ns::ttile<3>, &ns::ttile<4>, &ns::ttile<5>, &ns::ttile<6>}}
const TKernels TKERNELS_SCALAR = DSM_TKERNELS(scalar);
#ifdef DSM_X86
const TKernels TKERNELS_AVX2 = DSM_TKERNELS(avx2);
#endif

// The scalar loops or the AVX2 tiles (AVX-512 CPUs run the AVX2 ones: this path is not tuned for them).
const TKernels& tkernels() {
    kernels();  // picks the instruction set on first use
#ifdef DSM_X86
    if (g_isa.load(std::memory_order_relaxed) >= ISA_AVX2) return TKERNELS_AVX2;
#endif
    return TKERNELS_SCALAR;
}

// ----------------------------------------------------------------------------------------------------------
// The forward at training / prefill row counts: y (M, N) = x (M, K) @ dequant(W)^T with M >= g_strip_rows, int8
// or int4 codes (widen_rows_int8 / _int4; the tile is the same).
// The decode tiles above widen each weight vector in registers and use it for at most MB = 4 rows of x: ~107
// GFLOP/s at any M on 2 AVX2 cores (1408 x 2048), the widening costing as much as the FMAs. Here a panel of
// TKB = 16 rows of W is widened, scaled and transposed ONCE into an fp32 strip (K, 16) (128 KB at K = 2048: it
// stays in L2), and the transposed product's 6 x 16 register tile (ttile: broadcast a row of x, two strip
// vectors, 12 named accumulators) runs down it for all M rows: y[m0 .. m0+6, n0 .. n0+16] = x[m0 .. m0+6, :]
// @ strip. Panels are split over threads (no sum crosses threads). AVX-512 CPUs run the AVX2 tiles (as the
// backward does: this path is not tuned for them). Same readable twin: quant_matmul_reference.

// From 16 rows on: with the codes streaming from memory the strip path overtook the decode tiles between 8 and
// 16 rows of x (1 and 2 threads, 1408 x 2048 and 2048 x 1408, int8 and int4 in groups of 64; at 16 rows 1.0-1.3x,
// at 48 1.4-1.7x; benchmarks/finetune.py qfwd). dsm_set_strip_rows moves it.
std::atomic<int64_t> g_strip_rows{16};

// y[:, n0 .. n0 + 16] of p through the strip (thread-private scratch of K * TKB floats); widen: the codes' kind.
void strip_panel(const TKernels& tk, WidenRowsFn widen, const Problem& p, int64_t n0, float* strip) {
    const int64_t nk = p.N - n0 < TKB ? p.N - n0 : TKB;
    widen(p, n0, nk, strip);
    // ceil(M / 6) tiles of near-equal height (8 rows: 4 + 4, not 6 + 2): a tile of fewer rows has fewer
    // accumulators than the FMA units need in flight to hide their latency.
    const int64_t n_tiles = (p.M + TMB - 1) / TMB;
    for (int64_t i = 0, m0 = 0; i < n_tiles; ++i) {
        const int nm = int((p.M - m0) / (n_tiles - i) + ((p.M - m0) % (n_tiles - i) != 0));
        tk.tiles[nm - 1](TTile{p.x + m0 * p.ldx, p.ldx, p.K, strip, p.y + m0 * p.ldy + n0, p.ldy, nk});
        m0 += nm;
    }
}

void run_strip(const Problem& p, int bits, int n_threads) {
    const TKernels& tk = tkernels();
    const WidenRowsFn widen = bits == 8 ? tk.widen_rows8 : tk.widen_rows4;
    const int64_t panels = (p.N + TKB - 1) / TKB;
#pragma omp parallel num_threads(n_threads)
    {
        const std::unique_ptr<float[]> strip(new float[size_t(p.K * TKB)]);  // widen writes all of it: no zeroing
#pragma omp for schedule(static)
        for (int64_t b = 0; b < panels; ++b) strip_panel(tk, widen, p, b * TKB, strip.get());
    }
}

}  // namespace

extern "C" {

// Instruction sets: 0 scalar loops, 1 AVX2+FMA+F16C, 2 AVX-512. The kernels use the best supported one unless
// dsm_set_isa picked another (tests and benchmarks compare them in one process).
int dsm_isa_supported(int isa) { return isa >= 0 && isa < N_ISA && supported(isa); }
int dsm_best_isa() { return best_isa(); }
int dsm_get_isa() { kernels(); return g_isa.load(); }
int dsm_set_isa(int isa) {
    if (!dsm_isa_supported(isa)) return -1;
    g_isa.store(isa);
    return 0;
}

// x (M, K) fp32 -> q (M, nb * 32) int8 (rows zero-padded), d (M, nb) fp32; nb = ceil(K / 32).
void dsm_quantize_rows(const float* x, int64_t ldx, int64_t M, int64_t K, int8_t* q, float* d, int n_threads) {
    const int64_t nb = (K + 31) / 32;
#pragma omp parallel for num_threads(n_threads) schedule(static) if (M * K > (1 << 16))
    for (int64_t m = 0; m < M; ++m) quantize_row(x + m * ldx, K, q + m * nb * 32, d + m * nb, nb);
}

// The integer path of dsm_qgemm_int8 / _int4: x quantised per row and block of 32, then integer dot products.
// bits 8: w (N, K) int8, scale (N,) fp32; bits 4: w (N, K/2) kernel layout, scale (N, K/gs) fp16, gs % 32 == 0.
void dsm_qgemm_q8(const float* x, int64_t ldx, int64_t M, int64_t K, int bits, const void* w, const void* scale,
                  int64_t gs, int64_t N, float* y, int64_t ldy, int n_threads) {
    const int64_t nb = (K + 31) / 32;
    std::vector<int8_t> q(size_t(M * nb * 32));
    std::vector<float> d(size_t(M * nb));
    dsm_quantize_rows(x, ldx, M, K, q.data(), d.data(), n_threads);
    const Kernels& ks = kernels();
    run_q8(bits == 8 ? ks.q8_int8 : ks.q8_int4, QAct{q.data(), d.data(), nb * 32, nb}, M, K, bits, w, scale, gs, N,
           y, ldy, n_threads);
}

// x (M, K) fp32 rows ldx apart; w (N, K) int8; scale (N,) fp32; y (M, N) fp32 rows ldy apart. Any K, N.
// From dsm_get_strip_rows() rows of x on, the strip path (run_strip); below, the decode tiles.
void dsm_qgemm_int8(const float* x, int64_t ldx, int64_t M, int64_t K, const int8_t* w, const float* scale,
                    int64_t N, float* y, int64_t ldy, int n_threads) {
    const Problem p{x, ldx, M, K, w, scale, 0, N, y, ldy};
    if (M >= g_strip_rows.load(std::memory_order_relaxed)) run_strip(p, 8, n_threads);
    else run(kernels().int8, p, n_threads);
}

// dsm_qgemm_int8 for G groups of rows at once (the routed experts of one layer, the forward of a frozen int8
// base in training, quant/grad.py): group g is rows start[g] .. start[g] + len[g] of x (A, K) and y (A, N), both
// contiguous, times codes w + g * N * K (int8 (N, K)) and scales scale + g * N (fp32). One parallel region
// instead of one call (and a copy into y) per expert; work items are (group, panel of 16 columns), handed out
// as threads free up (experts have unequal rows, and on a busy machine a preempted thread then holds up no
// one: as fast as a static share of each group's panels in CPU time, faster in wall time). A group below
// dsm_get_strip_rows() rows takes the decode tiles on its panel. Rows outside every group are left as they are.
void dsm_qgemm_int8_grouped(const float* x, int64_t K, int64_t N, int64_t G, const int64_t* start,
                            const int64_t* len, const int8_t* w, const float* scale, float* y, int n_threads) {
    const int64_t panels = (N + TKB - 1) / TKB, strip_rows = g_strip_rows.load(std::memory_order_relaxed);
    const TKernels& tk = tkernels();
    const Kernels& ks = kernels();
#pragma omp parallel num_threads(n_threads)
    {
        const std::unique_ptr<float[]> strip(new float[size_t(K * TKB)]);
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < G * panels; ++it) {
            const int64_t g = it / panels, n0 = (it % panels) * TKB;
            if (len[g] == 0) continue;
            const Problem p{x + start[g] * K, K, len[g], K, w + g * N * K, scale + g * N, 0, N, y + start[g] * N, N};
            if (len[g] >= strip_rows) { strip_panel(tk, tk.widen_rows8, p, n0, strip.get()); continue; }
            for (int64_t b = n0; b < n0 + TKB && b < N; b += NB) tile_rows(ks.int8, p, b, 0, p.M);
        }
    }
}

// The row count from which dsm_qgemm_int8 takes the strip path (tests and benchmarks compare the two paths in
// one process; a huge value keeps the decode tiles everywhere). Returns the previous value.
int64_t dsm_set_strip_rows(int64_t rows) { return g_strip_rows.exchange(rows < 1 ? 1 : rows); }
int64_t dsm_get_strip_rows() { return g_strip_rows.load(); }

// w (N, K/2) uint8 in the kernel layout; scale (N, K/gs) fp16 bits; gs a multiple of 32. The strip path from
// dsm_get_strip_rows() rows on, as dsm_qgemm_int8.
void dsm_qgemm_int4(const float* x, int64_t ldx, int64_t M, int64_t K, const uint8_t* w, const uint16_t* scale,
                    int64_t gs, int64_t N, float* y, int64_t ldy, int n_threads) {
    const Problem p{x, ldx, M, K, w, scale, gs, N, y, ldy};
    if (M >= g_strip_rows.load(std::memory_order_relaxed)) run_strip(p, 4, n_threads);
    else run(kernels().int4, p, n_threads);
}

// The routed experts of one MoE layer on rows sorted by expert (decode, small groups): for each active
// expert e (rows start[a] .. start[a] + len[a]): h = silu(x W1_e^T) * (x W3_e^T) * gate; y = h W2_e^T.
// One call instead of ~7 tensor operations per expert; one parallel region with two barriers.
// Weights: w13 and w2 stacked (E, rows, ...) with their per-expert strides in bytes (codes) and elements (scales);
// bits13 / bits2 are 8 or 4 (int4: kernel layout, fp16 scales). h1, h3: (A, F) scratch.
void dsm_experts(const float* x, int64_t A, int64_t D, int64_t F, int64_t n_active, const int64_t* expert,
                 const int64_t* start, const int64_t* len, const void* w1, const void* w3, const void* s1,
                 const void* s3, int bits13, const void* w2, const void* s2, int bits2, int64_t gs,
                 const float* gate, float* h1, float* h3, float* y, int n_threads) {
    auto code_bytes = [](int bits, int64_t rows, int64_t cols) { return rows * (bits == 8 ? cols : cols / 2); };
    auto scale_bytes = [gs](int bits, int64_t rows, int64_t cols) {
        return bits == 8 ? rows * 4 : rows * (cols / gs) * 2;
    };
    const int64_t w13_stride = code_bytes(bits13, F, D), s13_stride = scale_bytes(bits13, F, D);
    const int64_t w2_stride = code_bytes(bits2, D, F), s2_stride = scale_bytes(bits2, D, F);
    const int64_t up_blocks = (F + NB - 1) / NB, down_blocks = (D + NB - 1) / NB;
    // Work items: (active expert, chunk of at most MCHUNK of its rows); each item runs over all weight blocks.
    std::vector<int64_t> item_a, item_lo;
    for (int64_t a = 0; a < n_active; ++a)
        for (int64_t lo = 0; lo < len[a]; lo += MCHUNK) { item_a.push_back(a); item_lo.push_back(lo); }
    const int64_t n_items = int64_t(item_a.size());
    const Kernels& ks = kernels();
    auto tile = [&ks](const Problem& p, int bits, int64_t n0, int64_t lo) {
        const int64_t hi = lo + MCHUNK < p.M ? lo + MCHUNK : p.M;
        tile_rows(bits == 8 ? ks.int8 : ks.int4, p, n0, lo, hi);
    };
#pragma omp parallel num_threads(n_threads)
    {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < n_items * up_blocks * 2; ++b) {
            const int64_t it = b / (up_blocks * 2), rest = b % (up_blocks * 2);
            const int64_t a = item_a[it];
            const bool is3 = rest >= up_blocks;
            const int64_t n0 = (rest % up_blocks) * NB, e = expert[a];
            const char* w = static_cast<const char*>(is3 ? w3 : w1) + e * w13_stride;
            const char* sc = static_cast<const char*>(is3 ? s3 : s1) + e * s13_stride;
            tile(Problem{x + start[a] * D, D, len[a], D, w, sc, gs, F, (is3 ? h3 : h1) + start[a] * F, F}, bits13,
                 n0, item_lo[it]);
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < A; ++r) {
            const float g = gate ? gate[r] : 1.0f;
            for (int64_t f = 0; f < F; ++f) {
                const float u = h1[r * F + f];
                h1[r * F + f] = u / (1.0f + std::exp(-u)) * h3[r * F + f] * g;
            }
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < n_items * down_blocks; ++b) {
            const int64_t it = b / down_blocks, a = item_a[it], n0 = (b % down_blocks) * NB, e = expert[a];
            const char* w = static_cast<const char*>(w2) + e * w2_stride;
            const char* sc = static_cast<const char*>(s2) + e * s2_stride;
            tile(Problem{h1 + start[a] * F, F, len[a], F, w, sc, gs, D, y + start[a] * D, D}, bits2, n0, item_lo[it]);
        }
    }
}

// dsm_experts on the integer path, with each expert's gate and up projections fused: one tile reads NB rows of
// w1 and the same NB rows of w3 against one load of the quantised activation block and writes
// h = silu(x w1^T) * (x w3^T) * gate for those columns at once. One parallel region, four phases: quantise x,
// gate+up (work items: active expert x row chunk x block of F, so experts and output rows share the threads),
// quantise h, down. h: (A, F) scratch.
void dsm_experts_q8(const float* x, int64_t A, int64_t D, int64_t F, int64_t n_active, const int64_t* expert,
                    const int64_t* start, const int64_t* len, const void* w1, const void* w3, const void* s1,
                    const void* s3, int bits13, const void* w2, const void* s2, int bits2, int64_t gs,
                    const float* gate, float* h, float* y, int n_threads) {
    auto scale_bytes = [gs](int bits, int64_t rows, int64_t cols) {
        return bits == 8 ? rows * 4 : rows * (cols / gs) * 2;
    };
    const int64_t w13_stride = F * row_bytes(bits13, D), s13_stride = scale_bytes(bits13, F, D);
    const int64_t w2_stride = D * row_bytes(bits2, F), s2_stride = scale_bytes(bits2, D, F);
    const int64_t up_blocks = (F + NB - 1) / NB, down_blocks = (D + NB - 1) / NB;
    const int64_t nbD = (D + 31) / 32, nbF = (F + 31) / 32;
    std::vector<int8_t> xq(size_t(A * nbD * 32)), hq(size_t(A * nbF * 32));
    std::vector<float> xd(size_t(A * nbD)), hd(size_t(A * nbF));
    const QAct ax{xq.data(), xd.data(), nbD * 32, nbD}, ah{hq.data(), hd.data(), nbF * 32, nbF};
    std::vector<int64_t> item_a, item_lo;
    for (int64_t a = 0; a < n_active; ++a)
        for (int64_t lo = 0; lo < len[a]; lo += MCHUNK) { item_a.push_back(a); item_lo.push_back(lo); }
    const int64_t n_items = int64_t(item_a.size());
    const Kernels& ks = kernels();
    const QTileTable& up = bits13 == 8 ? ks.q8_int8 : ks.q8_int4;
    const QTileTable& down = bits2 == 8 ? ks.q8_int8 : ks.q8_int4;
    auto char_at = [](const void* p, int64_t bytes) { return static_cast<const char*>(p) + bytes; };
#pragma omp parallel num_threads(n_threads)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < A; ++r) quantize_row(x + r * D, D, xq.data() + r * nbD * 32, xd.data() + r * nbD, nbD);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < n_items * up_blocks; ++b) {
            const int64_t it = b / up_blocks, a = item_a[it], e = expert[a], n0 = (b % up_blocks) * NB;
            const int nn = int(F - n0 < NB ? F - n0 : NB);
            const int64_t hi = item_lo[it] + MCHUNK < len[a] ? item_lo[it] + MCHUNK : len[a];
            for (int64_t m0 = item_lo[it]; m0 < hi; m0 += MB) {
                const int nm = int(hi - m0 < MB ? hi - m0 : MB);
                float g1[NB * MB], g3[NB * MB];  // [j * NB + i]
                QTile t{&ax, start[a] + m0, D, gs, {}, {}, {}, {}, NB};
                set_rows(t, 0, bits13, char_at(w1, e * w13_stride), char_at(s1, e * s13_stride), n0, nn, g1);
                set_rows(t, nn, bits13, char_at(w3, e * w13_stride), char_at(s3, e * s13_stride), n0, nn, g3);
                up[2 * nn - 1][nm - 1](t);
                for (int j = 0; j < nm; ++j) {
                    const int64_t r = start[a] + m0 + j;
                    const float gr = gate ? gate[r] : 1.0f;
                    for (int i = 0; i < nn; ++i) {
                        const float u = g1[j * NB + i];
                        h[r * F + n0 + i] = u / (1.0f + std::exp(-u)) * g3[j * NB + i] * gr;
                    }
                }
            }
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < A; ++r) quantize_row(h + r * F, F, hq.data() + r * nbF * 32, hd.data() + r * nbF, nbF);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < n_items * down_blocks; ++b) {
            const int64_t it = b / down_blocks, a = item_a[it], e = expert[a], n0 = (b % down_blocks) * NB;
            const int nn = int(D - n0 < NB ? D - n0 : NB);
            const int64_t hi = item_lo[it] + MCHUNK < len[a] ? item_lo[it] + MCHUNK : len[a];
            for (int64_t m0 = item_lo[it]; m0 < hi; m0 += MB) {
                const int nm = int(hi - m0 < MB ? hi - m0 : MB);
                QTile t{&ah, start[a] + m0, F, gs, {}, {}, {}, {}, D};
                set_rows(t, 0, bits2, char_at(w2, e * w2_stride), char_at(s2, e * s2_stride), n0, nn,
                         y + (start[a] + m0) * D + n0);
                down[nn - 1][nm - 1](t);
            }
        }
    }
}


// A SwiGLU FFN of width Fs on all M rows of x as one expert with gate 1 (an FFN is an expert): the MoE layer's
// shared experts, a dense block's FFN. h: 2 * M * Fs floats of scratch; y (M, D) written.
static void ffn_as_expert(const float* x, int64_t M, int64_t D, int64_t Fs, const void* w1, const void* w3,
                          const void* s1, const void* s3, int bits13, const void* w2, const void* s2, int bits2,
                          int64_t gs, int q8, float* h, float* y, int n_threads) {
    std::vector<int64_t> zero(1, 0), rows(1, M);
    if (q8)
        dsm_experts_q8(x, M, D, Fs, 1, zero.data(), zero.data(), rows.data(), w1, w3, s1, s3, bits13, w2, s2, bits2,
                       gs, nullptr, h, y, n_threads);
    else
        dsm_experts(x, M, D, Fs, 1, zero.data(), zero.data(), rows.data(), w1, w3, s1, s3, bits13, w2, s2, bits2, gs,
                    nullptr, h, h + M * Fs, y, n_threads);
}

// The Router's selection for one token (dsm_moe_one_token's first step): 1 on an exact tie at a cut, else 0.
static int route_token(const float* logits, int64_t E, const float* bias, int softmax, int64_t n_groups,
                       int64_t n_limited, int top2_sum, int64_t K, int norm_topk, float route_scale, int64_t* idx,
                       float* gates) {
    std::vector<float> s(static_cast<size_t>(E)), c(static_cast<size_t>(E));
    if (softmax) {
        float mx = -std::numeric_limits<float>::infinity(), sum = 0.0f;
        for (int64_t e = 0; e < E; ++e) mx = std::fmax(mx, logits[e]);
        for (int64_t e = 0; e < E; ++e) { s[e] = std::exp(logits[e] - mx); sum += s[e]; }
        for (int64_t e = 0; e < E; ++e) s[e] /= sum;
    } else {
        for (int64_t e = 0; e < E; ++e) s[e] = 1.0f / (1.0f + std::exp(-logits[e]));
    }
    for (int64_t e = 0; e < E; ++e) c[e] = bias ? s[e] + bias[e] : s[e];
    const float ninf = -std::numeric_limits<float>::infinity();
    // The best of c among the experts not yet taken (the lower index on ties); -1 when none is left.
    auto best_of = [](const float* v, int64_t n, const std::vector<char>& taken) {
        int64_t b = -1;
        for (int64_t i = 0; i < n; ++i)
            if (!taken[size_t(i)] && (b < 0 || v[i] > v[b])) b = i;
        return b;
    };
    if (n_limited < n_groups) {
        const int64_t per = E / n_groups;
        std::vector<float> score(static_cast<size_t>(n_groups));
        for (int64_t g = 0; g < n_groups; ++g) {
            const float* cg = c.data() + g * per;
            std::vector<char> none(size_t(per), 0);
            const int64_t a = best_of(cg, per, none);
            score[size_t(g)] = cg[a];
            if (top2_sum) { none[size_t(a)] = 1; score[size_t(g)] += cg[best_of(cg, per, none)]; }
        }
        std::vector<char> kept(size_t(n_groups), 0);
        int64_t last = -1;
        for (int64_t m = 0; m < n_limited; ++m) kept[size_t(last = best_of(score.data(), n_groups, kept))] = 1;
        if (score[size_t(best_of(score.data(), n_groups, kept))] == score[size_t(last)]) return 1;  // a tie at the cut
        for (int64_t g = 0; g < n_groups; ++g)
            if (!kept[size_t(g)]) for (int64_t i = 0; i < per; ++i) c[size_t(g * per + i)] = ninf;
    }
    std::vector<char> taken(size_t(E), 0);
    float total = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
        const int64_t e = best_of(c.data(), E, taken);
        taken[size_t(e)] = 1;
        idx[k] = e;
        gates[k] = s[size_t(e)];
        total += gates[k];
    }
    const int64_t next = best_of(c.data(), E, taken);
    if (next >= 0 && c[size_t(next)] == c[size_t(idx[K - 1])]) return 1;  // a tie at the cut
    for (int64_t k = 0; k < K; ++k) gates[k] = (norm_topk ? gates[k] / (total + 1e-20f) : gates[k]) * route_scale;
    return 0;
}

// A whole MoE layer for a few tokens (a decode step's, a speculative verification's) in one call: the router's
// selection from the logits u^T e_i, the K routed experts gated, the shared experts, and the sum, where in Python these were ~60 small tensor
// operations around the products (~300 us a layer of the mid-size model, a third of the layer). The selection is
// the Router's (moe/router.py): scores s = softmax or sigmoid of the logits; choice = s + bias;
// with n_limited < n_groups only the n_limited groups ranked best by their top choice (V2) or the sum of their
// two top choices (V3) stay candidates; the K best candidates; gates = s of those, normalised to sum 1 if
// norm_topk, times route_scale. An exact tie at either cut (the M-th group's score equals the next group's, the
// K-th choice the next expert's: a zero hidden state, a fresh router, saturated sigmoids) returns 1 with nothing
// computed: torch.topk breaks ties its own way, so the caller lets the Router decide; 0 otherwise. The routed
// experts run as dsm_experts(_q8) with one item per selected expert; the shared experts (Fs > 0) as one expert of
// width Fs with gate 1 (an FFN is an expert), on the integer path when sq8. Outputs: idx and gates (T, K),
// each token's best first; counts (E,) the assignments per expert (the layer's statistics); y (T, D), a token's
// sum_k expert_k(x) g_k + shared(x). x (T, D) and logits (T, E) contiguous.
int dsm_moe_one_token(const float* x, int64_t T, int64_t D, const float* logits, int64_t E, const float* bias,
                      int softmax, int64_t n_groups, int64_t n_limited, int top2_sum, int64_t K, int norm_topk,
                      float route_scale, int64_t F, const void* w1, const void* w3, const void* s1, const void* s3,
                      int bits13, const void* w2, const void* s2, int bits2, int64_t gs, int q8,
                      int64_t Fs, const void* sw1, const void* sw3, const void* ss1, const void* ss3, int sbits13,
                      const void* sw2, const void* ss2, int sbits2, int64_t sgs, int sq8,
                      int64_t* idx, float* gates, int64_t* counts, float* y, int n_threads) {
    for (int64_t t = 0; t < T; ++t)
        if (route_token(logits + t * E, E, bias, softmax, n_groups, n_limited, top2_sum, K, norm_topk, route_scale,
                        idx + t * K, gates + t * K))
            return 1;
    for (int64_t e = 0; e < E; ++e) counts[e] = 0;
    for (int64_t a = 0; a < T * K; ++a) ++counts[idx[a]];

    // Item a = t * K + k: expert idx[a] on row a, a copy of token t (each item writes its own row of h and y).
    const int64_t A = T * K;
    std::vector<float> xs(static_cast<size_t>(A * D)), ys(static_cast<size_t>(A * D)),
        h(static_cast<size_t>(2 * (A * F > T * Fs ? A * F : T * Fs)));
    std::vector<int64_t> start(static_cast<size_t>(A)), len(static_cast<size_t>(A), 1);
    for (int64_t a = 0; a < A; ++a) { std::memcpy(xs.data() + a * D, x + (a / K) * D, size_t(D) * 4); start[size_t(a)] = a; }
    if (q8)
        dsm_experts_q8(xs.data(), A, D, F, A, idx, start.data(), len.data(), w1, w3, s1, s3, bits13, w2, s2, bits2,
                       gs, gates, h.data(), ys.data(), n_threads);
    else
        dsm_experts(xs.data(), A, D, F, A, idx, start.data(), len.data(), w1, w3, s1, s3, bits13, w2, s2, bits2,
                    gs, gates, h.data(), h.data() + A * F, ys.data(), n_threads);
    for (int64_t t = 0; t < T; ++t)
        for (int64_t d = 0; d < D; ++d) {
            float acc = 0.0f;
            for (int64_t k = 0; k < K; ++k) acc += ys[size_t((t * K + k) * D + d)];
            y[t * D + d] = acc;
        }
    if (Fs > 0) {  // the shared experts on all T rows
        ffn_as_expert(x, T, D, Fs, sw1, sw3, ss1, ss3, sbits13, sw2, ss2, sbits2, sgs, sq8, h.data(), ys.data(),
                      n_threads);
        for (int64_t a = 0; a < T * D; ++a) y[a] += ys[size_t(a)];
    }
    return 0;
}

// One quantised projection for dsm_mla_one_token: y (M, N) = x (M, K, rows ldx apart) @ dequant(W)^T, with
// d = {codes, scales, bits, group size, N, K, integer activations (0/1)}.
static void mla_projection(const int64_t* d, const float* x, int64_t ldx, int64_t M, float* y, int n_threads) {
    const void* w = reinterpret_cast<const void*>(d[0]);
    const void* s = reinterpret_cast<const void*>(d[1]);
    const int bits = int(d[2]);
    const int64_t gs = d[3], N = d[4], K = d[5];
    if (d[6]) dsm_qgemm_q8(x, ldx, M, K, bits, w, s, gs, N, y, N, n_threads);
    else if (bits == 8) dsm_qgemm_int8(x, ldx, M, K, static_cast<const int8_t*>(w), static_cast<const float*>(s), N, y, N, n_threads);
    else dsm_qgemm_int4(x, ldx, M, K, static_cast<const uint8_t*>(w), static_cast<const uint16_t*>(s), gs, N, y, N, n_threads);
}

// mla_decode.cpp's entry points, passed in as addresses: the two libraries are built apart (that one with
// target_clones), and this call strings their steps together without returning to Python between them.
typedef void (*MlaPrepare)(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const float*, float,
                           const float*, const float*, int, float*, int64_t, int64_t, float*, int64_t, int64_t,
                           const float*, int64_t, int64_t, int64_t, int64_t, float*);
typedef void (*MlaDecode)(const float*, int64_t, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                          int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, int64_t, int64_t,
                          const uint8_t*, const float*, const float*, float, float*, float*, int);

// A whole MLA layer for T new tokens of B rows (a decode step, a verification) with quantised projections, in one
// call, where MLA.forward ran four products, two norms, two rotations, the cache write and the absorbed attention
// as ~15 Python-level calls (~600 us a mid-size layer beyond its kernels' work, inside a decode step):
//   q = wq_b(RMSNorm(wq_a(x)) * q_norm) (or wq(x) when wq_a is absent), kv_raw = wkv_a(x);
//   dsm_mla_prepare: the latent's norm and the rotary key into the cache's slots start .. start + T, q's rotary
//   half rotated; dsm_mla_decode over the S = start + T cached slots; y = wo(attention).
// proj: 5 descriptors of 7 (mla_projection's d) for wq_a, wq_b, wq, wkv_a, wo (codes 0: absent). kv_cache /
// pe_cache: the cache's storage (rows kv_b / pe_b apart, slots kv_s / pe_s apart). scratch: dsm_mla_decode's.
// The readable reference is MLA.forward's own path, which the tests compare against.
void dsm_mla_one_token(const float* x, int64_t B, int64_t T, int64_t D, const int64_t* proj, const float* q_norm_w,
                       float q_eps, int64_t H, int64_t N, int64_t R, int64_t C, int64_t V, const float* kv_norm_w,
                       float kv_eps, const float* cos, const float* sin, int interleave, float* kv_cache, int64_t kv_b,
                       int64_t kv_s, float* pe_cache, int64_t pe_b, int64_t pe_s, int64_t start, const uint8_t* mask,
                       const float* w_uk, const float* w_uv_t, float scale, void* prepare_fn, void* decode_fn,
                       float* scratch, float* y, int n_threads) {
    const int64_t M = B * T, QW = N + R, S = start + T;
    std::vector<float> q(static_cast<size_t>(M * H * QW)), kvr(static_cast<size_t>(M * (C + R)));
    std::vector<float> q_pe(static_cast<size_t>(M * H * R)), att(static_cast<size_t>(M * H * V));
    const int64_t *wq_a = proj, *wq_b = proj + 7, *wq = proj + 14, *wkv_a = proj + 21, *wo = proj + 28;
    if (wq_a[0]) {
        const int64_t L = wq_a[4];
        std::vector<float> a(static_cast<size_t>(M * L));
        mla_projection(wq_a, x, D, M, a.data(), n_threads);
        for (int64_t m = 0; m < M; ++m) rms_row(a.data() + m * L, L, q_norm_w, q_eps, a.data() + m * L);
        mla_projection(wq_b, a.data(), L, M, q.data(), n_threads);
    } else {
        mla_projection(wq, x, D, M, q.data(), n_threads);
    }
    mla_projection(wkv_a, x, D, M, kvr.data(), n_threads);
    reinterpret_cast<MlaPrepare>(prepare_fn)(kvr.data(), T * (C + R), C + R, B, T, C, R, kv_norm_w, kv_eps, cos, sin,
                                             interleave, kv_cache + start * kv_s, kv_b, kv_s, pe_cache + start * pe_s,
                                             pe_b, pe_s, q.data() + N, T * H * QW, H * QW, QW, H, q_pe.data());
    reinterpret_cast<MlaDecode>(decode_fn)(q.data(), QW, q_pe.data(), R, B, T, H, N, R, C, V, kv_cache, kv_b, kv_s,
                                           pe_cache, pe_b, pe_s, S, mask, w_uk, w_uv_t, scale, att.data(), scratch,
                                           n_threads);
    mla_projection(wo, att.data(), H * V, M, y, n_threads);
}

// A whole decoder block for T new tokens of B rows (M = B * T <= 16: a decode step, a verification) in one call,
// where Block.forward ran two norms, the MLA layer's call, the router's logits, the MoE layer's call and two residual
// adds as ~25 Python-level steps (~400 us a mid-size block beyond its kernels' work, inside a decode step):
//   x1 = x + MLA(RMSNorm(x) * attn_norm_w)             dsm_mla_one_token, its arguments as there (proj .. decode_fn)
//   h = RMSNorm(x1) * ffn_norm_w
//   y = x1 + MoE(h): logits = h router_w^T, then dsm_moe_one_token (its arguments as there, E .. sq8);
//       with no router (router_w null), y = x1 + FFN(h), the FFN given as the shared expert (Fs > 0)
// The router's logits are summed in double per row: every row as a row alone is summed (a verification's k + 1
// tokens get the logits each would get in a decode step), equal to torch's fp32 product to rounding.
// Returns 0 with y (M, D) and, for a MoE layer, counts (E,) (the assignments per expert) written; 1 on an exact tie
// at the router's cut: then y holds x1, the cache its new slots, and the caller runs the FFN norm and the MoE layer
// itself. x, y contiguous (M, D); y may not be x.
int dsm_block_one_token(const float* x, int64_t B, int64_t T, int64_t D, const float* attn_norm_w, float attn_eps,
                        const int64_t* proj, const float* q_norm_w, float q_eps, int64_t H, int64_t N, int64_t R,
                        int64_t C, int64_t V, const float* kv_norm_w, float kv_eps, const float* cos,
                        const float* sin, int interleave, float* kv_cache, int64_t kv_b, int64_t kv_s,
                        float* pe_cache, int64_t pe_b, int64_t pe_s, int64_t start, const uint8_t* mask,
                        const float* w_uk, const float* w_uv_t, float scale, void* prepare_fn, void* decode_fn,
                        const float* ffn_norm_w, float ffn_eps, const float* router_w, int64_t E,
                        const float* bias, int softmax, int64_t n_groups, int64_t n_limited, int top2_sum, int64_t K,
                        int norm_topk, float route_scale, int64_t F, const void* w1, const void* w3, const void* s1,
                        const void* s3, int bits13, const void* w2, const void* s2, int bits2, int64_t gs, int q8,
                        int64_t Fs, const void* sw1, const void* sw3, const void* ss1, const void* ss3, int sbits13,
                        const void* sw2, const void* ss2, int sbits2, int64_t sgs, int sq8, int64_t* counts,
                        float* y, int n_threads) {
    const int64_t M = B * T, S = start + T;
    std::vector<float> a(static_cast<size_t>(M * D)), hv(static_cast<size_t>(M * D));
    std::vector<float> scratch(static_cast<size_t>(M * H * (2 * C + S))), gates(static_cast<size_t>(M * (K > 0 ? K : 1)));
    std::vector<int64_t> idx(static_cast<size_t>(M * (K > 0 ? K : 1)));
    float* h = hv.data();
    for (int64_t m = 0; m < M; ++m) rms_row(x + m * D, D, attn_norm_w, attn_eps, h + m * D);
    dsm_mla_one_token(h, B, T, D, proj, q_norm_w, q_eps, H, N, R, C, V, kv_norm_w, kv_eps, cos, sin, interleave,
                      kv_cache, kv_b, kv_s, pe_cache, pe_b, pe_s, start, mask, w_uk, w_uv_t, scale, prepare_fn,
                      decode_fn, scratch.data(), a.data(), n_threads);
    for (int64_t i = 0; i < M * D; ++i) y[i] = x[i] + a[i];
    for (int64_t m = 0; m < M; ++m) rms_row(y + m * D, D, ffn_norm_w, ffn_eps, h + m * D);
    if (router_w) {
        std::vector<float> logits(static_cast<size_t>(M * E));
        for (int64_t m = 0; m < M; ++m)
            for (int64_t e = 0; e < E; ++e) {
                const float* hr = h + m * D;
                const float* wr = router_w + e * D;
                double acc = 0.0;
#pragma omp simd reduction(+ : acc)
                for (int64_t d = 0; d < D; ++d) acc += double(hr[d]) * double(wr[d]);
                logits[size_t(m * E + e)] = float(acc);
            }
        if (dsm_moe_one_token(h, M, D, logits.data(), E, bias, softmax, n_groups, n_limited, top2_sum, K, norm_topk,
                              route_scale, F, w1, w3, s1, s3, bits13, w2, s2, bits2, gs, q8, Fs, sw1, sw3, ss1, ss3,
                              sbits13, sw2, ss2, sbits2, sgs, sq8, idx.data(), gates.data(), counts, a.data(),
                              n_threads))
            return 1;
    } else {  // a dense block: its FFN
        std::vector<float> hh(static_cast<size_t>(2 * M * Fs));
        ffn_as_expert(h, M, D, Fs, sw1, sw3, ss1, ss3, sbits13, sw2, ss2, sbits2, sgs, sq8, hh.data(), a.data(),
                      n_threads);
    }
    for (int64_t i = 0; i < M * D; ++i) y[i] += a[i];
    return 0;
}

// dx = dy @ dequant(W) for G groups of rows (the routed experts of one layer; G = 1 for a dense layer): group g
// is rows start[g] .. start[g] + len[g] of dy (A, N) and dx (A, K), both contiguous, with codes
// w + g * N * K (int8 (N, K)) and scales scale + g * N (fp32). Rows outside every group are left as they are.
void dsm_qgrad_int8(const float* dy, int64_t N, int64_t K, int64_t G, const int64_t* start, const int64_t* len,
                    const int8_t* w, const float* scale, float* dx, int n_threads) {
    int64_t A = 0;
    for (int64_t g = 0; g < G; ++g) A = start[g] + len[g] > A ? start[g] + len[g] : A;
    std::vector<float> ds(size_t(A * N));  // dy * scale: the tiles then only multiply
    const int64_t panels = (K + TPANEL - 1) / TPANEL;
    const TKernels& tk = tkernels();
#pragma omp parallel num_threads(n_threads)
    {
        for (int64_t g = 0; g < G; ++g) {
#pragma omp for schedule(static) nowait
            for (int64_t r = start[g]; r < start[g] + len[g]; ++r)
                for (int64_t n = 0; n < N; ++n) ds[r * N + n] = dy[r * N + n] * scale[g * N + n];
        }
#pragma omp barrier
        std::vector<float> strip(size_t(N * TKB));
        // Experts have unequal rows: items are handed out as threads free up.
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < G * panels; ++it) {
            const int64_t g = it / panels, k_lo = (it % panels) * TPANEL;
            if (len[g] == 0) continue;
            const int64_t k_hi = k_lo + TPANEL < K ? k_lo + TPANEL : K;
            for (int64_t k0 = k_lo; k0 < k_hi; k0 += TKB) {
                const int64_t nk = k_hi - k0 < TKB ? k_hi - k0 : TKB;
                tk.widen(w + g * N * K + k0, K, N, nk, strip.data());
                for (int64_t m0 = 0; m0 < len[g]; m0 += TMB) {
                    const int nm = int(len[g] - m0 < TMB ? len[g] - m0 : TMB);
                    const int64_t r = start[g] + m0;
                    tk.tiles[nm - 1](TTile{ds.data() + r * N, N, N, strip.data(), dx + r * K + k0, K, nk});
                }
            }
        }
    }
}

}  // extern "C"
