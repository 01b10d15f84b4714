// Weight-only quantised matrix products for the CPU: y (M, N) = x (M, K) @ dequant(W (N, K))^T, fp32 in and out.
//
// Decode is memory-bound: every weight byte is read once per step, so the kernels read int8 / int4 codes,
// widen them to fp32 in registers and multiply-add against the activations; the dequantised matrix never
// exists in memory. Up to MB rows of x share each widened weight vector (batched decode, small expert groups).
// Parallel over output rows with OpenMP (the runtime torch itself loads, so one thread pool).
//
// The readable reference is deepseek_moe/kernels/quant_matmul.py (dequantise, then matmul); tests compare them.
// Built at run time by kernels/cpu_build.py with -march=native; without AVX-512 the plain loops are compiled.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define DSM_AVX512 1
#endif

namespace {

constexpr int NB = 4;  // rows of W per micro-tile (x is loaded once for all of them)
constexpr int MB = 4;  // rows of x per micro-tile (each widened weight vector is used MB times)

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

// Arguments shared by the micro-tiles: x (M, K) rows ldx apart, y (M, N) rows ldy apart.
struct Problem {
    const float* x; int64_t ldx; int64_t M; int64_t K;
    const void* w; const void* scale; int64_t gs; int64_t N;
    float* y; int64_t ldy;
};

// y[m0:m0+nm, n0:n0+nn] for int8 W (N, K), per-row fp32 scales. Accumulators: nn x nm vectors of 16 lanes.
template <int nn, int nm>
void tile_int8(const Problem& p, int64_t n0, int64_t m0) {
    const int8_t* w = static_cast<const int8_t*>(p.w) + n0 * p.K;
    const float* scale = static_cast<const float*>(p.scale) + n0;
    const float* x = p.x + m0 * p.ldx;
    float sums[nn][nm] = {};
    int64_t k = 0;
#ifdef DSM_AVX512
    __m512 acc[nn][nm];
    for (int i = 0; i < nn; ++i) for (int j = 0; j < nm; ++j) acc[i][j] = _mm512_setzero_ps();
    for (; k + 16 <= p.K; k += 16) {
        __m512 xv[nm];
        for (int j = 0; j < nm; ++j) xv[j] = _mm512_loadu_ps(x + j * p.ldx + k);
        for (int i = 0; i < nn; ++i) {
            __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + i * p.K + k))));
            for (int j = 0; j < nm; ++j) acc[i][j] = _mm512_fmadd_ps(wv, xv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < nn; ++i) for (int j = 0; j < nm; ++j) sums[i][j] = _mm512_reduce_add_ps(acc[i][j]);
#endif
    for (; k < p.K; ++k)
        for (int i = 0; i < nn; ++i)
            for (int j = 0; j < nm; ++j) sums[i][j] += float(w[i * p.K + k]) * x[j * p.ldx + k];
    for (int i = 0; i < nn; ++i)
        for (int j = 0; j < nm; ++j) p.y[(m0 + j) * p.ldy + n0 + i] = sums[i][j] * scale[i];
}

// The same for int4 W in the kernel layout (in each group of gs columns, byte j = column j in the low nibble,
// column j + gs/2 in the high one, each + 8) with fp16 group scales (N, K/gs). Decoding is a table lookup:
// per row and group a 16-entry table holds (code - 8) * scale, and vpermps indexes it with the nibbles (it
// reads only the low 4 bits of each lane), so a weight costs no convert, subtract or multiply.
template <int nn, int nm>
void tile_int4(const Problem& p, int64_t n0, int64_t m0) {
    const int64_t half = p.gs / 2, G = p.K / p.gs, row_bytes = p.K / 2;
    const uint8_t* w = static_cast<const uint8_t*>(p.w) + n0 * row_bytes;
    const uint16_t* scale = static_cast<const uint16_t*>(p.scale) + n0 * G;
    const float* x = p.x + m0 * p.ldx;
    float sums[nn][nm] = {};
#ifdef DSM_AVX512
    __m512 acc[nn][nm];
    for (int i = 0; i < nn; ++i) for (int j = 0; j < nm; ++j) acc[i][j] = _mm512_setzero_ps();
    const __m512 codes = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    for (int64_t g = 0; g < G; ++g) {
        __m512 table[nn];
        for (int i = 0; i < nn; ++i) table[i] = _mm512_mul_ps(codes, _mm512_set1_ps(half_to_float(scale[i * G + g])));
        for (int64_t jj = 0; jj < half; jj += 16) {
            const int64_t k_lo = g * p.gs + jj, k_hi = k_lo + half;
            __m512 xl[nm], xh[nm];
            for (int j = 0; j < nm; ++j) {
                xl[j] = _mm512_loadu_ps(x + j * p.ldx + k_lo);
                xh[j] = _mm512_loadu_ps(x + j * p.ldx + k_hi);
            }
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
    for (int i = 0; i < nn; ++i) for (int j = 0; j < nm; ++j) sums[i][j] = _mm512_reduce_add_ps(acc[i][j]);
#else
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
#endif
    for (int i = 0; i < nn; ++i)
        for (int j = 0; j < nm; ++j) p.y[(m0 + j) * p.ldy + n0 + i] = sums[i][j];
}

using TileFn = void (*)(const Problem&, int64_t, int64_t);

template <int nn, int nm> struct Int8Tile { static constexpr TileFn fn = &tile_int8<nn, nm>; };
template <int nn, int nm> struct Int4Tile { static constexpr TileFn fn = &tile_int4<nn, nm>; };

template <template <int, int> class T>
TileFn pick(int nn, int nm) {
    // nn, nm in 1..4
    static const TileFn table[NB][MB] = {
        {T<1, 1>::fn, T<1, 2>::fn, T<1, 3>::fn, T<1, 4>::fn},
        {T<2, 1>::fn, T<2, 2>::fn, T<2, 3>::fn, T<2, 4>::fn},
        {T<3, 1>::fn, T<3, 2>::fn, T<3, 3>::fn, T<3, 4>::fn},
        {T<4, 1>::fn, T<4, 2>::fn, T<4, 3>::fn, T<4, 4>::fn},
    };
    return table[nn - 1][nm - 1];
}

constexpr int64_t MCHUNK = 64;  // rows of x kept hot (in L2) while every weight row streams past them

template <template <int, int> class T>
void tile_rows(const Problem& p, int64_t n0, int64_t m_lo, int64_t m_hi) {
    const int nn = int(p.N - n0 < NB ? p.N - n0 : NB);
    for (int64_t m0 = m_lo; m0 < m_hi; m0 += MB) {
        const int nm = int(m_hi - m0 < MB ? m_hi - m0 : MB);
        pick<T>(nn, nm)(p, n0, m0);
    }
}

template <template <int, int> class T>
void run(const Problem& p, int n_threads) {
    // Blocks of NB rows of W over threads; each block walks a chunk of x in blocks of MB rows. W is streamed
    // from memory once per MCHUNK rows of x (once, for decode), x stays in cache.
    const int64_t n_blocks = (p.N + NB - 1) / NB;
    for (int64_t m_lo = 0; m_lo < p.M; m_lo += MCHUNK) {
        const int64_t m_hi = m_lo + MCHUNK < p.M ? m_lo + MCHUNK : p.M;
#pragma omp parallel for num_threads(n_threads) schedule(static)
        for (int64_t b = 0; b < n_blocks; ++b) tile_rows<T>(p, b * NB, m_lo, m_hi);
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
    run<Int8Tile>(Problem{x, ldx, M, K, w, scale, 0, N, y, ldy}, n_threads);
}

// w (N, K/2) uint8 in the kernel layout; scale (N, K/gs) fp16 bits; gs a multiple of 32.
void dsm_qgemm_int4(const float* x, int64_t ldx, int64_t M, int64_t K, const uint8_t* w, const uint16_t* scale,
                    int64_t gs, int64_t N, float* y, int64_t ldy, int n_threads) {
    run<Int4Tile>(Problem{x, ldx, M, K, w, scale, gs, N, y, ldy}, n_threads);
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
    auto tile = [](const Problem& p, int bits, int64_t n0, int64_t lo) {
        const int64_t hi = lo + MCHUNK < p.M ? lo + MCHUNK : p.M;
        if (bits == 8) tile_rows<Int8Tile>(p, n0, lo, hi); else tile_rows<Int4Tile>(p, n0, lo, hi);
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

}  // extern "C"
