// Matrix products with fp32 or bf16 weights for the CPU: y (M, N) = x (M, K) @ W (N, K)^T, x and y fp32.
//
// Why: on CPUs without AVX512-BF16 (AVX2-only machines, many AMD EPYCs), torch runs a bf16 matmul through a
// slow generic loop, several times slower than fp32, and a batch-1 decode step is memory-bound anyway. These
// tiles read bf16 weights as they are stored (half the bytes of fp32), widen them to fp32 in registers (a bf16
// is the top half of an fp32: a 16-bit shift) and accumulate in fp32. fp32 weights run through the same tiles,
// which is what lets a whole MoE layer's routed experts run as one call (dsm_fexperts) instead of a sort,
// three grouped products and a combine per decoded token.
//
// Micro-tiles of NB rows of W by MB rows of x, so each widened weight vector is used MB times and each x
// vector NB times. Parallel over blocks of W's rows with OpenMP (torch's own runtime: one thread pool). With
// many rows of x (prefill) K is cut into chunks of KC columns so each chunk of x stays in the core's L2 while
// every block of W passes over it.
//
// Two paths: AVX2+FMA (compiled through a target attribute, picked from CPUID at run time) and scalar loops
// (any CPU; forced by dsm_fgemm_set_isa(0) for the tests). The readable reference is
// deepseek_moe/kernels/float_matmul.py (x.float() @ w.float().T); tests compare both paths against it.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <atomic>
#include <vector>
#include <omp.h>
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define DSM_X86 1
#include <immintrin.h>
#define DSM_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace {

constexpr int NB = 4;          // rows of W per micro-tile
constexpr int MB = 4;          // rows of x per micro-tile
constexpr int64_t KC = 1024;   // columns per K chunk when x has more than MB rows (64 rows x 1024 fp32 = 256 KB)

struct Problem {
    const float* x; int64_t ldx;   // x (M, K), rows ldx apart
    int64_t M;
    const void* w; int64_t ldw;    // W (N, K), rows ldw elements apart
    bool bf16;
    float* y; int64_t ldy;         // y (M, N), rows ldy apart
    int64_t k0, k1;                // the columns of this pass
    bool accumulate;               // y += (a later K chunk) rather than y =
};

inline float bf16_to_float(uint16_t h) {
    uint32_t bits = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

template <bool BF16>
inline float weight_at(const void* w, int64_t i) {
    if constexpr (BF16) return bf16_to_float(static_cast<const uint16_t*>(w)[i]);
    else return static_cast<const float*>(w)[i];
}

template <bool BF16>
inline const void* row_of(const void* w, int64_t row, int64_t ldw) {
    return static_cast<const char*>(w) + row * ldw * (BF16 ? 2 : 4);
}

inline void store(const Problem& p, int64_t m, int64_t n, float v) {
    float& out = p.y[m * p.ldy + n];
    out = p.accumulate ? out + v : v;
}

namespace scalar {

template <bool BF16, int nn, int nm>
void tile(const Problem& p, int64_t n0, int64_t m0) {
    float sums[nn][nm] = {};
    for (int i = 0; i < nn; ++i) {
        const void* w = row_of<BF16>(p.w, n0 + i, p.ldw);
        for (int64_t k = p.k0; k < p.k1; ++k) {
            const float wk = weight_at<BF16>(w, k);
            for (int j = 0; j < nm; ++j) sums[i][j] += wk * p.x[(m0 + j) * p.ldx + k];
        }
    }
    for (int i = 0; i < nn; ++i)
        for (int j = 0; j < nm; ++j) store(p, m0 + j, n0 + i, sums[i][j]);
}

}  // namespace scalar

#ifdef DSM_X86
namespace avx2 {

DSM_AVX2 inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

template <bool BF16>
DSM_AVX2 inline __m256 load8(const void* w, int64_t k) {
    if constexpr (BF16) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + k));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {
        return _mm256_loadu_ps(static_cast<const float*>(w) + k);
    }
}

template <bool BF16, int nn, int nm>
DSM_AVX2 void tile(const Problem& p, int64_t n0, int64_t m0) {
    const void* w[nn];
    for (int i = 0; i < nn; ++i) w[i] = row_of<BF16>(p.w, n0 + i, p.ldw);
    // The rows the next tile of this thread reads (static schedule: adjacent): rows of 2-4 KB are too short
    // for the hardware prefetcher to ramp up on.
    const char* next = static_cast<const char*>(row_of<BF16>(p.w, n0 + nn, p.ldw));
    const int64_t row_bytes = p.ldw * (BF16 ? 2 : 4), step_bytes = BF16 ? 16 : 32;
    const float* x = p.x + m0 * p.ldx;
    __m256 acc[nn][nm];
    for (int i = 0; i < nn; ++i) for (int j = 0; j < nm; ++j) acc[i][j] = _mm256_setzero_ps();
    int64_t k = p.k0;
    for (; k + 8 <= p.k1; k += 8) {
        __m256 xv[nm];
        for (int j = 0; j < nm; ++j) xv[j] = _mm256_loadu_ps(x + j * p.ldx + k);
        if (m0 == 0 && ((k * step_bytes / 8) & 63) == 0)
            for (int i = 0; i < nn; ++i) _mm_prefetch(next + i * row_bytes + k * step_bytes / 8, _MM_HINT_T0);
        for (int i = 0; i < nn; ++i) {
            const __m256 wv = load8<BF16>(w[i], k);
            for (int j = 0; j < nm; ++j) acc[i][j] = _mm256_fmadd_ps(wv, xv[j], acc[i][j]);
        }
    }
    float sums[nn][nm];
    for (int i = 0; i < nn; ++i) for (int j = 0; j < nm; ++j) sums[i][j] = hsum(acc[i][j]);
    for (; k < p.k1; ++k)
        for (int i = 0; i < nn; ++i) {
            const float wk = weight_at<BF16>(w[i], k);
            for (int j = 0; j < nm; ++j) sums[i][j] += wk * x[j * p.ldx + k];
        }
    for (int i = 0; i < nn; ++i)
        for (int j = 0; j < nm; ++j) store(p, m0 + j, n0 + i, sums[i][j]);
}

}  // namespace avx2
#endif

using Tile = void (*)(const Problem&, int64_t, int64_t);

// table[nn - 1][nm - 1]: the tile for a block of nn <= NB rows of W and nm <= MB rows of x.
struct Tiles { Tile t[NB][MB]; };

template <template <bool, int, int> class Maker, bool BF16>
Tiles make_tiles() {
    Tiles ts{};
    ts.t[0][0] = Maker<BF16, 1, 1>::f; ts.t[0][1] = Maker<BF16, 1, 2>::f; ts.t[0][2] = Maker<BF16, 1, 3>::f;
    ts.t[0][3] = Maker<BF16, 1, 4>::f; ts.t[1][0] = Maker<BF16, 2, 1>::f; ts.t[1][1] = Maker<BF16, 2, 2>::f;
    ts.t[1][2] = Maker<BF16, 2, 3>::f; ts.t[1][3] = Maker<BF16, 2, 4>::f; ts.t[2][0] = Maker<BF16, 3, 1>::f;
    ts.t[2][1] = Maker<BF16, 3, 2>::f; ts.t[2][2] = Maker<BF16, 3, 3>::f; ts.t[2][3] = Maker<BF16, 3, 4>::f;
    ts.t[3][0] = Maker<BF16, 4, 1>::f; ts.t[3][1] = Maker<BF16, 4, 2>::f; ts.t[3][2] = Maker<BF16, 4, 3>::f;
    ts.t[3][3] = Maker<BF16, 4, 4>::f;
    return ts;
}

template <bool BF16, int nn, int nm> struct ScalarTile { static constexpr Tile f = scalar::tile<BF16, nn, nm>; };
#ifdef DSM_X86
template <bool BF16, int nn, int nm> struct Avx2Tile { static constexpr Tile f = avx2::tile<BF16, nn, nm>; };
#endif

std::atomic<int> g_isa{-1};  // 0 scalar, 1 avx2; -1: not chosen yet (atomic: ctypes calls come from many threads)

int best_isa() {
#ifdef DSM_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
    return 0;
}

const Tiles& tiles(bool bf16) {
    static const Tiles scalar32 = make_tiles<ScalarTile, false>(), scalar16 = make_tiles<ScalarTile, true>();
#ifdef DSM_X86
    static const Tiles avx32 = make_tiles<Avx2Tile, false>(), avx16 = make_tiles<Avx2Tile, true>();
#endif
    if (g_isa < 0) g_isa = best_isa();
#ifdef DSM_X86
    if (g_isa == 1) return bf16 ? avx16 : avx32;
#endif
    return bf16 ? scalar16 : scalar32;
}

// y[m_lo:m_hi, n0:n0+nn] for every MB rows of x, one block of W.
inline void block(const Tiles& ts, const Problem& p, int64_t n0, int64_t nn, int64_t m_lo, int64_t m_hi) {
    for (int64_t m0 = m_lo; m0 < m_hi; m0 += MB) {
        const int64_t nm = m_hi - m0 < MB ? m_hi - m0 : MB;
        ts.t[nn - 1][nm - 1](p, n0, m0);
    }
}

}  // namespace

extern "C" {

int dsm_fgemm_best_isa() { return best_isa(); }
int dsm_fgemm_get_isa() { if (g_isa < 0) g_isa = best_isa(); return g_isa; }
// 0 on success, -1 if this CPU cannot run ``isa``.
int dsm_fgemm_set_isa(int isa) {
    if (isa < 0 || isa > best_isa()) return -1;
    g_isa = isa;
    return 0;
}

// y (M, N) = x (M, K) @ W (N, K)^T; W fp32 or (bf16 != 0) bf16, rows ldw elements apart.
void dsm_fgemm(const float* x, int64_t ldx, int64_t M, int64_t K, const void* w, int64_t ldw, int bf16, int64_t N,
               float* y, int64_t ldy, int n_threads) {
    const Tiles& ts = tiles(bf16 != 0);
    const int64_t kc = M <= MB || K <= KC ? (K > 0 ? K : 1) : KC, n_blocks = (N + NB - 1) / NB;
#pragma omp parallel num_threads(n_threads)
    for (int64_t k0 = 0; k0 < (K > 0 ? K : 1); k0 += kc) {
        const Problem p{x, ldx, M, w, ldw, bf16 != 0, y, ldy, k0, k0 + kc < K ? k0 + kc : K, k0 > 0};
#pragma omp for schedule(static)
        for (int64_t b = 0; b < n_blocks; ++b) {
            const int64_t n0 = b * NB;
            block(ts, p, n0, N - n0 < NB ? N - n0 : NB, 0, M);
        }
    }
}

// The routed experts of one MoE layer, SwiGLU, in one call. Item a runs expert[a] on len[a] rows of x (., D)
// from row x_start[a] and writes rows start[a] .. start[a] + len[a] of y (A, D): rows grouped by expert
// (x_start == start), or, for one token, the token's row once per selected expert (x_start all 0) so nothing is
// gathered. w1, w3 (E, F, D), w2 (E, D, F), contiguous, fp32 or (bf16 != 0) bf16. gate (A,) or null;
// h1, h3 (A, F) scratch; y = w2[e] (silu(w1[e] x) * w3[e] x * gate).
void dsm_fexperts(const float* x, int64_t A, int64_t D, int64_t F, int64_t n_active, const int64_t* expert,
                  const int64_t* x_start, const int64_t* start, const int64_t* len, const void* w1, const void* w3,
                  const void* w2, int bf16, const float* gate, float* h1, float* h3, float* y, int n_threads) {
    const Tiles& ts = tiles(bf16 != 0);
    const int64_t esize = bf16 ? 2 : 4;
    const int64_t up_blocks = (F + NB - 1) / NB, down_blocks = (D + NB - 1) / NB;
    auto at = [esize](const void* w, int64_t e, int64_t stride) {
        return static_cast<const void*>(static_cast<const char*>(w) + e * stride * esize);
    };
#pragma omp parallel num_threads(n_threads)
    {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < n_active * up_blocks * 2; ++b) {
            const int64_t a = b / (up_blocks * 2), rest = b % (up_blocks * 2);
            const bool is3 = rest >= up_blocks;
            const int64_t n0 = (rest % up_blocks) * NB, e = expert[a];
            const Problem p{x + x_start[a] * D, D, len[a], at(is3 ? w3 : w1, e, F * D), D, bf16 != 0,
                            (is3 ? h3 : h1) + start[a] * F, F, 0, D, false};
            block(ts, p, n0, F - n0 < NB ? F - n0 : NB, 0, len[a]);
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
        for (int64_t b = 0; b < n_active * down_blocks; ++b) {
            const int64_t a = b / down_blocks, n0 = (b % down_blocks) * NB, e = expert[a];
            const Problem p{h1 + start[a] * F, F, len[a], at(w2, e, D * F), F, bf16 != 0, y + start[a] * D, D, 0, F,
                            false};
            block(ts, p, n0, D - n0 < NB ? D - n0 : NB, 0, len[a]);
        }
    }
}

}  // extern "C"
