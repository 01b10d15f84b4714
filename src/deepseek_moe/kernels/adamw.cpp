// One AdamW step over an fp32 master weight that also writes the weight's bf16 compute copy.
//
// Under bf16 autocast every forward used to cast each fp32 weight to bf16 afresh: a pass that reads the master
// (4 bytes a weight) and writes a new copy (2 bytes) right after the optimizer pass has just read and written the
// same master. Writing the copy here, from the value in a register, makes that pass free.
//
// The update is torch.optim.AdamW's (decoupled weight decay, bias-corrected moments, eps outside the sqrt) in
// fp32; the readable reference is deepseek_moe/kernels/adamw.py's twin, and tests compare the two and the
// result against torch.optim.AdamW. Parallel with OpenMP (the runtime torch itself loads, so one thread pool).

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

// fp32 -> bf16, round to nearest even, as torch's .to(torch.bfloat16); NaN stays a (quiet) NaN.
inline uint16_t to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7fffffffu) > 0x7f800000u ? static_cast<uint16_t>((u >> 16) | 0x40u) : static_cast<uint16_t>(rounded);
}

// bf16 -> fp32: exact (a bf16 value is the upper half of an fp32 one).
inline float from_bf16(uint16_t h) {
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// One element's update, in place; returns the new weight.
inline float adamw_one(float& param, float g, float& exp_avg, float& exp_avg_sq, float beta1, float beta2,
                       float one_minus_beta1, float one_minus_beta2, float eps, float decay, float step_size,
                       float bc2_sqrt) {
    const float m = exp_avg + one_minus_beta1 * (g - exp_avg);
    const float v = beta2 * exp_avg_sq + one_minus_beta2 * g * g;
    const float p = param * decay - step_size * m / (std::sqrt(v) / bc2_sqrt + eps);
    exp_avg = m;
    exp_avg_sq = v;
    param = p;
    return p;
}

}  // namespace

extern "C" {

// param, grad, exp_avg, exp_avg_sq: n fp32 values each; copy: n bf16 values (may be null: no copy kept).
// decay = 1 - lr * weight_decay; step_size = lr / (1 - beta1^t); bc2_sqrt = sqrt(1 - beta2^t).
void dsm_adamw_step(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, uint16_t* copy, int64_t n,
                    float beta1, float beta2, float eps, float decay, float step_size, float bc2_sqrt) {
    const float one_minus_beta1 = 1.0f - beta1, one_minus_beta2 = 1.0f - beta2;
    // Two loops rather than a test inside one, so that each vectorises.
    if (copy) {
#pragma omp parallel for simd schedule(static)
        for (int64_t i = 0; i < n; ++i) {
            const float p = adamw_one(param[i], grad[i], exp_avg[i], exp_avg_sq[i], beta1, beta2, one_minus_beta1,
                                      one_minus_beta2, eps, decay, step_size, bc2_sqrt);
            copy[i] = to_bf16(p);
        }
    } else {
#pragma omp parallel for simd schedule(static)
        for (int64_t i = 0; i < n; ++i)
            adamw_one(param[i], grad[i], exp_avg[i], exp_avg_sq[i], beta1, beta2, one_minus_beta1, one_minus_beta2,
                      eps, decay, step_size, bc2_sqrt);
    }
}

// The same update with exp_avg and exp_avg_sq held in bf16 (DeepSeek-V3's moments, train/narrow_moments.py):
// widened for the update, rounded back to nearest even, all in registers. n values each; no compute copy.
void dsm_adamw_step_bf16_moments(float* param, const float* grad, uint16_t* exp_avg, uint16_t* exp_avg_sq,
                                 int64_t n, float beta1, float beta2, float eps, float decay, float step_size,
                                 float bc2_sqrt) {
    const float one_minus_beta1 = 1.0f - beta1, one_minus_beta2 = 1.0f - beta2;
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; ++i) {
        float m = from_bf16(exp_avg[i]), v = from_bf16(exp_avg_sq[i]);
        adamw_one(param[i], grad[i], m, v, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, decay, step_size,
                  bc2_sqrt);
        exp_avg[i] = to_bf16(m);
        exp_avg_sq[i] = to_bf16(v);
    }
}

}  // extern "C"
