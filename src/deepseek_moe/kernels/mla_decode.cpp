// Absorbed Multi-head Latent Attention for a few new tokens per batch row (a decode step, a speculative
// verification), fp32, in one call.
//
// For each new token of row b and head h (DeepSeek-V2 §2.1 with wkv_b folded into the query and the output):
//   q_lat[c]   = sum_n q_nope[b,t,h,n] * w_uk[h,n,c]
//   score[s]   = scale * (sum_c q_lat[c] * kv[b,s,c] + sum_r q_pe[b,t,h,r] * k_pe[b,s,r])   (unseen slot: -inf)
//   p          = softmax(score)
//   o_lat[c]   = sum_s p[s] * kv[b,s,c]
//   out[b,t,h,v] = sum_c o_lat[c] * w_uv_t[h,c,v]
// In PyTorch this is four batched products, a softmax and ~20 reshapes, transposes and casts a layer (and at
// T > 1 a causal mask built in every layer); at decode those small calls cost more than the arithmetic (issue
// 22). Here: one parallel region whose phases split the work between the threads (the absorbed products by
// head, the scores by cache slot, the softmax by row, the value sum by tile of heads and latent columns), the
// scores reading each cached slot once for all heads and new tokens. Meant for a few new tokens: the scores
// are dot products, not a GEMM, so a prefill leaves it to torch (kernels/mla_decode.py: MAX_NEW_TOKENS).
//
// The loops are plain C++ vectorised by the compiler (`omp simd`), built twice through `target_clones`
// (AVX2+FMA and the baseline) where GCC and glibc allow, so the library loads on any x86-64 CPU. The readable reference is
// deepseek_moe/model/mla.py's MLA._absorbed, which tests compare against.

#include <cmath>
#include <cstdint>
#include <limits>

#include "rms_row.inc"

// target_clones with "arch=" needs GCC 11 and the loader's ifunc (glibc); elsewhere (clang, older GCC, musl,
// -DDSM_NO_SIMD) one baseline build.
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && \
    defined(__GLIBC__) && !defined(DSM_NO_SIMD)
#define DSM_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define DSM_CLONES
#endif

namespace {

// y[0..n) += a * x[0..n)
inline void axpy(float* __restrict y, float a, const float* __restrict x, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// y[0..m) = x[0..k) @ w (k rows of m, contiguous): a head's absorbed product, read row by row.
inline void vecmat(float* __restrict y, const float* __restrict x, const float* __restrict w, int64_t k, int64_t m) {
    for (int64_t i = 0; i < m; ++i) y[i] = 0.0f;
    for (int64_t r = 0; r < k; ++r) axpy(y, x[r], w + r * m, m);
}

// a . b[j] for four vectors b[j] at once: four independent chains of multiply-adds (one alone waits on the
// latency of each add: 2x slower over 4,000 cache slots).
inline void dot4(const float* __restrict a, const float* __restrict b0, const float* __restrict b1,
                 const float* __restrict b2, const float* __restrict b3, int64_t n, float* out) {
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t i = 0; i < n; ++i) {
        s0 += a[i] * b0[i];
        s1 += a[i] * b1[i];
        s2 += a[i] * b2[i];
        s3 += a[i] * b3[i];
    }
    out[0] += s0; out[1] += s1; out[2] += s2; out[3] += s3;
}

}  // namespace

extern "C" {

// T new tokens per batch row, query row q = b * T + t. q_nope row (q, h) at q_nope + (q * H + h) * ld_qn, N values;
// q_pe likewise (ld_qp, R values). kv (b, s) at kv + b * kv_bs + s * kv_ss, C values; k_pe likewise (pe_bs, pe_ss,
// R values); S slots per row, the T new ones last. mask: (B * T, S) bytes, nonzero where query row q may attend
// slot s, or null: causal (new token t sees slots 0 .. S - T + t). w_uk (H, N, C), w_uv_t (H, C, V) contiguous.
// out (B * T, H, V) contiguous. scratch: B * T * H * (2 * C + S) floats.
DSM_CLONES
void dsm_mla_decode(const float* q_nope, int64_t ld_qn, const float* q_pe, int64_t ld_qp, int64_t B, int64_t T,
                    int64_t H, int64_t N, int64_t R, int64_t C, int64_t V, const float* kv, int64_t kv_bs,
                    int64_t kv_ss, const float* k_pe, int64_t pe_bs, int64_t pe_ss, int64_t S, const uint8_t* mask,
                    const float* w_uk, const float* w_uv_t, float scale, float* out, float* scratch, int n_threads) {
    const int64_t Q = B * T, QH = Q * H;
    float* q_lat = scratch;               // (Q*H, C)
    float* o_lat = scratch + QH * C;      // (Q*H, C)
    float* score = scratch + 2 * QH * C;  // (Q*H, S)
    constexpr int HT = 4, CT = 16;  // the value sum's register tile: heads x latent columns
    const int64_t n_htiles = (H + HT - 1) / HT, n_ctiles = (C + CT - 1) / CT;
    const int64_t s_chunk = 16, n_schunks = (S + s_chunk - 1) / s_chunk;
    auto visible = [=](int64_t q, int64_t s) {
        return mask != nullptr ? mask[q * S + s] != 0 : s <= S - T + q % T;
    };
#pragma omp parallel num_threads(n_threads)
    {
        // q_lat = q_nope @ w_uk[h], by head: w_uk[h] (N x C) is read once for every query row.
#pragma omp for schedule(static)
        for (int64_t h = 0; h < H; ++h)
            for (int64_t q = 0; q < Q; ++q)
                vecmat(q_lat + (q * H + h) * C, q_nope + (q * H + h) * ld_qn, w_uk + h * N * C, N, C);
        // Scores by chunk of cache slots: each slot's latent and rotary key are read once for all heads and new
        // tokens of its row.
#pragma omp for schedule(static)
        for (int64_t item = 0; item < B * n_schunks; ++item) {
            const int64_t b = item / n_schunks, s0 = (item % n_schunks) * s_chunk;
            const int64_t s1 = s0 + s_chunk < S ? s0 + s_chunk : S;
            for (int64_t s = s0; s < s1; s += 4) {  // four slots at a time (a short last group repeats its last slot)
                const float *k[4], *p[4];
                for (int j = 0; j < 4; ++j) {
                    const int64_t sj = s + j < s1 ? s + j : s1 - 1;
                    k[j] = kv + b * kv_bs + sj * kv_ss;
                    p[j] = k_pe + b * pe_bs + sj * pe_ss;
                }
                for (int64_t q = b * T; q < (b + 1) * T; ++q)
                    for (int64_t h = 0; h < H; ++h) {
                        float sums[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                        dot4(q_lat + (q * H + h) * C, k[0], k[1], k[2], k[3], C, sums);
                        dot4(q_pe + (q * H + h) * ld_qp, p[0], p[1], p[2], p[3], R, sums);
                        for (int j = 0; j < 4 && s + j < s1; ++j)
                            score[(q * H + h) * S + s + j] =
                                visible(q, s + j) ? scale * sums[j] : -std::numeric_limits<float>::infinity();
                    }
            }
        }
        // Softmax by row (q, h). A row whose every slot is masked gives NaN, as softmax over all -inf does.
#pragma omp for schedule(static)
        for (int64_t row = 0; row < QH; ++row) {
            float* sc = score + row * S;
            float m = -std::numeric_limits<float>::infinity();
            for (int64_t s = 0; s < S; ++s) m = sc[s] > m ? sc[s] : m;
            float total = 0.0f;
            for (int64_t s = 0; s < S; ++s) { sc[s] = std::exp(sc[s] - m); total += sc[s]; }
            const float inv = 1.0f / total;
            for (int64_t s = 0; s < S; ++s) sc[s] *= inv;
        }
        // o_lat = p @ kv by tiles of 4 heads x 16 latent columns, summed in registers over every slot (adding
        // into memory slot by slot was 2.5x slower at 4,000 slots).
#pragma omp for schedule(static)
        for (int64_t item = 0; item < Q * n_htiles * n_ctiles; ++item) {
            const int64_t q = item / (n_htiles * n_ctiles), rest = item % (n_htiles * n_ctiles), b = q / T;
            const int64_t h0 = (rest / n_ctiles) * HT, c0 = (rest % n_ctiles) * CT;
            if (h0 + HT <= H && c0 + CT <= C) {
                float acc[HT][CT] = {};
                const float* pr = score + (q * H + h0) * S;
                for (int64_t s = 0; s < S; ++s) {
                    const float* kvs = kv + b * kv_bs + s * kv_ss + c0;
                    for (int hh = 0; hh < HT; ++hh) {
                        const float ps = pr[hh * S + s];
#pragma omp simd
                        for (int c = 0; c < CT; ++c) acc[hh][c] += ps * kvs[c];
                    }
                }
                for (int hh = 0; hh < HT; ++hh)
                    for (int c = 0; c < CT; ++c) o_lat[(q * H + h0 + hh) * C + c0 + c] = acc[hh][c];
                continue;
            }
            // An edge tile (H not a multiple of 4, C not of 16): the same sums, one row at a time.
            const int64_t h1 = h0 + HT < H ? h0 + HT : H, nc = c0 + CT < C ? CT : C - c0;
            for (int64_t h = h0; h < h1; ++h) {
                float* o = o_lat + (q * H + h) * C + c0;
                for (int64_t c = 0; c < nc; ++c) o[c] = 0.0f;
                for (int64_t s = 0; s < S; ++s)
                    axpy(o, score[(q * H + h) * S + s], kv + b * kv_bs + s * kv_ss + c0, nc);
            }
        }
        // out = o_lat @ w_uv_t[h], by head.
#pragma omp for schedule(static)
        for (int64_t h = 0; h < H; ++h)
            for (int64_t q = 0; q < Q; ++q)
                vecmat(out + (q * H + h) * V, o_lat + (q * H + h) * C, w_uv_t + h * C * V, C, V);
    }
}

// Before the attention, for the T new tokens of each row b (query row q = b * T + t): what MLA.forward does to the
// projections' outputs between wkv_a / wq_b and the cache, in PyTorch ~25 operations a layer (two rotations, the
// latent's RMSNorm, the cache append):
//   kv_out[q]  = RMSNorm(kv_raw[q][0 .. C)) * norm_w            (the latent c_kv, into its cache slot)
//   pe_out[q]  = rotate(kv_raw[q][C .. C + R), cos[q], sin[q])  (the shared rotary key, into its cache slot)
//   q_pe_out[q, h] = rotate(q_pe[q, h], cos[q], sin[q])         (contiguous (B * T, H, R))
// rotate: pairs (x[2i], x[2i+1]) when interleave (V2/V3 checkpoints), else halves (x[i], x[i + R/2]), turned by
// angle i: (x1 cos - x2 sin, x2 cos + x1 sin). cos/sin: (B * T, R / 2) contiguous. kv_raw row q at b * kv_b + t *
// kv_t; q_pe row (q, h) at b * q_b + t * q_t + h * q_h; kv_out / pe_out rows at b * out_b + t * out_t (the cache's
// strides, offset to its first new slot). The references are model/norm.py and model/rope.py, which tests compare.
DSM_CLONES
void dsm_mla_prepare(const float* kv_raw, int64_t kv_b, int64_t kv_t, int64_t B, int64_t T, int64_t C, int64_t R,
                     const float* norm_w, float eps, const float* cos, const float* sin, int interleave,
                     float* kv_out, int64_t kvo_b, int64_t kvo_t, float* pe_out, int64_t peo_b, int64_t peo_t,
                     const float* q_pe, int64_t q_b, int64_t q_t, int64_t q_h, int64_t H, float* q_pe_out) {
    const int64_t half = R / 2;
    auto rotate = [=](const float* x, const float* c, const float* sn, float* y) {
        for (int64_t i = 0; i < half; ++i) {
            const int64_t i1 = interleave ? 2 * i : i, i2 = interleave ? 2 * i + 1 : i + half;
            const float x1 = x[i1], x2 = x[i2];
            y[i1] = x1 * c[i] - x2 * sn[i];
            y[i2] = x2 * c[i] + x1 * sn[i];
        }
    };
    for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < T; ++t) {
            const int64_t q = b * T + t;
            const float* xr = kv_raw + b * kv_b + t * kv_t;
            rms_row(xr, C, norm_w, eps, kv_out + b * kvo_b + t * kvo_t);
            rotate(xr + C, cos + q * half, sin + q * half, pe_out + b * peo_b + t * peo_t);
            for (int64_t h = 0; h < H; ++h)
                rotate(q_pe + b * q_b + t * q_t + h * q_h, cos + q * half, sin + q * half, q_pe_out + (q * H + h) * R);
        }
}

}  // extern "C"
