// AdamW with the semantics of ONNX Runtime's AdamWOptimizer (adam_mode=1, bias correction folded into the
// learning rate, weight decay after the update), the same float32 math as fedhft/edge_runtime/adamw.py.
// Compile with -ffp-contract=off so no multiply-add is fused: results then match numpy bit for bit.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

namespace fedhft {

struct AdamWConfig {
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-6f;
  float weight_decay = 0.0f;
  bool bias_correction = true;
};

// The bias-corrected step size for 1-based `step` (pow in double, then rounded to float, as ORT does).
inline float corrected_lr(float lr, int64_t step, const AdamWConfig& c) {
  if (!c.bias_correction) return lr;
  const float a = static_cast<float>(1.0 - std::pow(static_cast<double>(c.beta1), static_cast<double>(step)));
  const float b = static_cast<float>(1.0 - std::pow(static_cast<double>(c.beta2), static_cast<double>(step)));
  return lr * std::sqrt(b) / a;
}

// One in-place update of n elements.
inline void adamw_update(float* p, const float* g, float* m, float* v, size_t n, float lr, int64_t step,
                         const AdamWConfig& c) {
  const float lr_t = corrected_lr(lr, step, c);
  const float one_b1 = 1.0f - c.beta1;
  const float one_b2 = 1.0f - c.beta2;
  for (size_t i = 0; i < n; ++i) {
    const float gi = g[i];
    m[i] = c.beta1 * m[i] + one_b1 * gi;
    v[i] = c.beta2 * v[i] + one_b2 * gi * gi;
    p[i] = p[i] - (lr_t * m[i]) / (std::sqrt(v[i]) + c.eps);
    if (c.weight_decay != 0.0f) p[i] = p[i] - lr * c.weight_decay * p[i];
  }
}

}  // namespace fedhft
