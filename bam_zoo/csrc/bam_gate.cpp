// Fused CPU kernels of bam_zoo: BAM's gate (float32, NCHW or channels_last) and its few-channel convolutions
// (float32, NCHW).
//
// The gate  y = x * (1 + sigmoid(Mc + Ms))  (sum fusion).
//
// Why: written with ATen ops the gate makes about 3 full-size passes forward and 8 backward (plus their
// allocations); here it is one pass each way. The sigmoid of the broadcast sum is computed without a
// full-size exp: with A = exp(-Mc) (N x C) and B = exp(-Ms) (N x HW), both small and computed by the caller,
//     g = sigmoid(Mc + Ms) = 1 / (1 + A * B),   g * (1 - g) = A * B * g * g,
// so every full-size element costs a multiply-add and one division. The caller guarantees |Mc|, |Ms| <= 40 so
// that A * B stays finite (the Python side falls back to ATen ops otherwise).
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
// An AVX-512, an AVX2+FMA and a baseline copy of each row kernel, picked at load time by the CPU.
#define BAM_ZOO_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=haswell", "default")))
#else
#define BAM_ZOO_CLONES
#endif

namespace {

// A float32 tensor of x's shape in the given memory format (contiguous or channels_last).
at::Tensor empty_like_in(const at::Tensor& x, c10::MemoryFormat format) {
  return at::empty(x.sizes(), x.options().memory_format(format));
}

// out[i] = x[i] * (1 + g[i]) with g[i] = 1 / (1 + a * b[i])
BAM_ZOO_CLONES
void gate_forward_row(const float* __restrict x, const float* __restrict b, float a, float* __restrict out,
                      int64_t len) {
  for (int64_t i = 0; i < len; ++i) {
    const float g = 1.f / (1.f + a * b[i]);
    out[i] = x[i] + x[i] * g;
  }
}

// dx[i] = dy[i] * (1 + g), dz = dy * x * g * (1 - g); ds[i] += dz; returns sum(dz) over the row.
BAM_ZOO_CLONES
float gate_backward_row(const float* __restrict dy, const float* __restrict x, const float* __restrict b, float a,
                        float* __restrict dx, float* __restrict ds, int64_t len) {
  float dc = 0.f;
#pragma omp simd reduction(+ : dc)
  for (int64_t i = 0; i < len; ++i) {
    const float ab = a * b[i];
    const float g = 1.f / (1.f + ab);
    const float d = dy[i];
    const float dz = d * x[i] * (ab * g) * g;
    dx[i] = d + d * g;
    ds[i] += dz;
    dc += dz;
  }
  return dc;
}

// Channels-last: `pixels` rows of C values. out[p, i] = x[p, i] * (1 + g) with g = 1 / (1 + a[i] * b[p])
BAM_ZOO_CLONES
void gate_forward_pixels(const float* __restrict x, const float* __restrict a, const float* __restrict b,
                         float* __restrict out, int64_t pixels, int64_t c) {
  for (int64_t p = 0; p < pixels; ++p) {
    const float bp = b[p];
    const float* xr = x + p * c;
    float* orow = out + p * c;
    for (int64_t i = 0; i < c; ++i) {
      const float g = 1.f / (1.f + a[i] * bp);
      orow[i] = xr[i] + xr[i] * g;
    }
  }
}

// Channels-last backward of `pixels` rows: dx = dy * (1 + g), dz = dy * x * g * (1 - g); dc[i] += dz over the
// rows, ds[p] = sum of dz over the row's channels (its spatial-logit gradient).
BAM_ZOO_CLONES
void gate_backward_pixels(const float* __restrict dy, const float* __restrict x, const float* __restrict a,
                          const float* __restrict b, float* __restrict dx, float* __restrict dc,
                          float* __restrict ds, int64_t pixels, int64_t c) {
  for (int64_t p = 0; p < pixels; ++p) {
    const float bp = b[p];
    const int64_t off = p * c;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < c; ++i) {
      const float ab = a[i] * bp;
      const float g = 1.f / (1.f + ab);
      const float d = dy[off + i];
      const float dz = d * x[off + i] * (ab * g) * g;
      dx[off + i] = d + d * g;
      dc[i] += dz;
      acc += dz;
    }
    ds[p] = acc;
  }
}

// The layout of x: Contiguous (NCHW) or ChannelsLast (NHWC); anything else is refused.
c10::MemoryFormat check_inputs(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "bam_gate: x must be a 4-D float32 CPU tensor");
  const bool nchw = x.is_contiguous();
  TORCH_CHECK(nchw || x.is_contiguous(c10::MemoryFormat::ChannelsLast),
              "bam_gate: x must be contiguous or channels_last contiguous");
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  TORCH_CHECK(a.is_contiguous() && a.scalar_type() == at::kFloat && a.numel() == n * c,
              "bam_gate: a must hold N*C contiguous float32 values");
  TORCH_CHECK(b.is_contiguous() && b.scalar_type() == at::kFloat && b.numel() == n * hw,
              "bam_gate: b must hold N*H*W contiguous float32 values");
  return nchw ? c10::MemoryFormat::Contiguous : c10::MemoryFormat::ChannelsLast;
}

// Rows of this many elements or more are split into chunks so small batches still use every thread.
int64_t num_chunks(int64_t n, int64_t hw) {
  const int64_t threads = at::get_num_threads();
  const int64_t wanted = (4 * threads + n - 1) / n;
  return std::max<int64_t>(1, std::min<int64_t>(wanted, hw / 256));
}

at::Tensor gate_forward(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b) {
  const c10::MemoryFormat format = check_inputs(x, a, b);
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  at::Tensor out = empty_like_in(x, format);
  const float* xp = x.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (format == c10::MemoryFormat::ChannelsLast) {  // rows are pixels: N*HW rows of C values
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(c, 1));
    at::parallel_for(0, n * hw, grain, [&](int64_t begin, int64_t end) {
      while (begin < end) {  // one call per run of pixels of one sample
        const int64_t sample = begin / hw, stop = std::min(end, (sample + 1) * hw);
        gate_forward_pixels(xp + begin * c, ap + sample * c, bp + begin, op + begin * c, stop - begin, c);
        begin = stop;
      }
    });
    return out;
  }
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(hw, 1));
  at::parallel_for(0, n * c, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t sample = row / c;
      gate_forward_row(xp + row * hw, bp + sample * hw, ap[row], op + row * hw, hw);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                             const at::Tensor& a, const at::Tensor& b) {
  const c10::MemoryFormat format = check_inputs(x, a, b);
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.is_contiguous(format) &&
                  grad_out.scalar_type() == at::kFloat,
              "bam_gate: grad_out must be float32 with x's shape and memory format");
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  const int64_t chunks = num_chunks(n, hw);
  const int64_t chunk_len = (hw + chunks - 1) / chunks;
  at::Tensor grad_x = empty_like_in(x, format);
  at::Tensor grad_s = at::zeros({n, hw}, x.options());
  const bool nhwc = format == c10::MemoryFormat::ChannelsLast;
  // One partial channel-logit gradient per task, summed at the end (tasks split each sample's pixels).
  at::Tensor grad_c_parts = nhwc ? at::zeros({n, chunks, c}, x.options()) : at::empty({n, chunks, c}, x.options());
  const float* dyp = grad_out.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  float* dxp = grad_x.data_ptr<float>();
  float* dsp = grad_s.data_ptr<float>();
  float* dcp = grad_c_parts.data_ptr<float>();
  at::parallel_for(0, n * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t sample = task / chunks, chunk = task % chunks;
      const int64_t start = chunk * chunk_len, len = std::min(hw, start + chunk_len) - start;
      if (nhwc) {
        const int64_t first = sample * hw + start;
        if (len > 0)
          gate_backward_pixels(dyp + first * c, xp + first * c, ap + sample * c, bp + first, dxp + first * c,
                               dcp + task * c, dsp + first, len, c);
        continue;
      }
      for (int64_t ch = 0; ch < c; ++ch) {
        const int64_t offset = (sample * c + ch) * hw + start;
        dcp[task * c + ch] = len > 0 ? gate_backward_row(dyp + offset, xp + offset, bp + sample * hw + start,
                                                         ap[sample * c + ch], dxp + offset,
                                                         dsp + sample * hw + start, len)
                                     : 0.f;
      }
    }
  });
  return {grad_x, grad_c_parts.sum(1), grad_s};
}


// ---- Few-channel stride-1 convolutions (BAM's spatial branch when C/r is 1 to 4) -------------------------
//
// oneDNN runs convolutions with one to four channels at large batch several times slower than their size
// warrants (a 1 -> 1 dilated 3x3 at 256 x 28 x 28: 6.7 ms forward+backward; here about 0.3 ms). These are
// direct loops: every tap is a shifted multiply-add over a contiguous row segment, which vectorises.

struct ConvGeometry {
  int64_t n, cin, cout, h, w, kh, kw, ph, pw, dh, dw, ho, wo;
};

ConvGeometry conv_geometry(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef padding,
                           at::IntArrayRef dilation) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "small_conv: x must be a contiguous 4-D float32 CPU tensor");
  TORCH_CHECK(weight.dim() == 4 && weight.is_contiguous() && weight.scalar_type() == at::kFloat &&
                  weight.size(1) == x.size(1),
              "small_conv: weight must be a contiguous float32 (C_out, C_in, kH, kW) tensor matching x");
  TORCH_CHECK(padding.size() == 2 && dilation.size() == 2, "small_conv: padding and dilation take two values");
  ConvGeometry g{x.size(0), x.size(1), weight.size(0), x.size(2), x.size(3), weight.size(2), weight.size(3),
                 padding[0], padding[1], dilation[0], dilation[1], 0, 0};
  g.ho = g.h + 2 * g.ph - g.dh * (g.kh - 1);
  g.wo = g.w + 2 * g.pw - g.dw * (g.kw - 1);
  TORCH_CHECK(g.ho > 0 && g.wo > 0, "small_conv: the kernel does not fit the padded input");
  return g;
}

// For one tap: output rows/cols [lo, hi) read input at (o + offset), which must lie in [0, size).
inline void valid_range(int64_t out_size, int64_t in_size, int64_t offset, int64_t& lo, int64_t& hi) {
  lo = std::max<int64_t>(0, -offset);
  hi = std::min<int64_t>(out_size, in_size - offset);
}

// y[i] += a * x[i]   (inlined into the per-CPU clones below)
inline void axpy(float* __restrict y, const float* __restrict x, float a, int64_t len) {
  for (int64_t i = 0; i < len; ++i) y[i] += a * x[i];
}

// sum_i y[i] * x[i]
inline float dot(const float* __restrict y, const float* __restrict x, int64_t len) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < len; ++i) acc += y[i] * x[i];
  return acc;
}

// Calls fn(oi, oj, row_lo, row_hi, col_lo, col_hi, tap) for every tap whose valid region is not empty.
template <typename Fn>
inline void for_each_tap(const ConvGeometry& g, Fn fn) {
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t oi = i * g.dh - g.ph;
    int64_t r0, r1;
    valid_range(g.ho, g.h, oi, r0, r1);
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t oj = j * g.dw - g.pw;
      int64_t c0, c1;
      valid_range(g.wo, g.w, oj, c0, c1);
      if (r0 < r1 && c0 < c1) fn(oi, oj, r0, r1, c0, c1, i * g.kw + j);
    }
  }
}

// Where the output is as wide as the input (BAM's same-size convolutions), a tap reads the input plane at one
// flat offset from the output, so it is one long multiply-add over the span from its first to its last valid
// output instead of one short one per row (rows of 7-28 floats cost more in loop overhead than in arithmetic).
// Outputs in that span whose column reads outside the input are masked: column_masks()[j] holds 1 where column
// tap j is valid, 0 elsewhere, over a whole output plane.
std::vector<float> column_masks(const ConvGeometry& g) {
  const int64_t plane = g.ho * g.wo;
  std::vector<float> masks(g.wo == g.w ? g.kw * plane : 0);
  for (int64_t j = 0; j < g.kw && g.wo == g.w; ++j) {
    int64_t c0, c1;
    valid_range(g.wo, g.w, j * g.dw - g.pw, c0, c1);
    for (int64_t p = 0; p < plane; ++p) masks[j * plane + p] = (p % g.wo >= c0 && p % g.wo < c1) ? 1.f : 0.f;
  }
  return masks;
}

// out (one output plane) += conv(in (one input plane), wk (that pair's kh x kw taps)); masks from column_masks.
BAM_ZOO_CLONES
void conv_plane_forward(float* __restrict out, const float* __restrict in, const float* __restrict wk,
                        const float* __restrict masks, const ConvGeometry& g) {
  for_each_tap(g, [&](int64_t oi, int64_t oj, int64_t r0, int64_t r1, int64_t c0, int64_t c1, int64_t t) {
    if (masks == nullptr) {  // rows of different widths
      for (int64_t r = r0; r < r1; ++r) axpy(out + r * g.wo + c0, in + (r + oi) * g.w + c0 + oj, wk[t], c1 - c0);
      return;
    }
    const int64_t lo = r0 * g.wo + c0, hi = (r1 - 1) * g.wo + c1, off = oi * g.w + oj;
    const float* m = masks + (t % g.kw) * g.ho * g.wo;
    const float a = wk[t];
    for (int64_t p = lo; p < hi; ++p) out[p] += a * m[p] * in[p + off];
  });
}

// For one (output, input) plane pair: dx += conv_transpose(dy, wk); dwk = correlation of dy and in. With
// column masks, masked_dy[j] is dy times column_masks()[j] (computed once per output plane).
BAM_ZOO_CLONES
void conv_plane_backward(float* __restrict dx, float* __restrict dwk, const float* __restrict dy,
                         const float* __restrict in, const float* __restrict wk, const float* __restrict masked_dy,
                         const ConvGeometry& g) {
  std::fill(dwk, dwk + g.kh * g.kw, 0.f);  // taps that never overlap the input keep a zero gradient
  for_each_tap(g, [&](int64_t oi, int64_t oj, int64_t r0, int64_t r1, int64_t c0, int64_t c1, int64_t t) {
    float acc = 0.f;
    if (masked_dy != nullptr) {
      const int64_t lo = r0 * g.wo + c0, hi = (r1 - 1) * g.wo + c1, off = oi * g.w + oj;
      const float* d = masked_dy + (t % g.kw) * g.ho * g.wo;
      const float a = wk[t];
#pragma omp simd reduction(+ : acc)
      for (int64_t p = lo; p < hi; ++p) {
        dx[p + off] += a * d[p];
        acc += d[p] * in[p + off];
      }
      dwk[t] = acc;
      return;
    }
    for (int64_t r = r0; r < r1; ++r) {
      const float* dyr = dy + r * g.wo + c0;
      const int64_t in_off = (r + oi) * g.w + c0 + oj;
      axpy(dx + in_off, dyr, wk[t], c1 - c0);
      acc += dot(dyr, in + in_off, c1 - c0);
    }
    dwk[t] = acc;
  });
}

at::Tensor small_conv_forward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              at::IntArrayRef padding, at::IntArrayRef dilation) {
  const ConvGeometry g = conv_geometry(x, weight, padding, dilation);
  at::Tensor y = at::empty({g.n, g.cout, g.ho, g.wo}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->is_contiguous() && bias->scalar_type() == at::kFloat && bias->numel() == g.cout,
                "small_conv: bias must hold C_out float32 values");
    bp = bias->data_ptr<float>();
  }
  float* yp = y.data_ptr<float>();
  const int64_t in_plane = g.h * g.w, out_plane = g.ho * g.wo, taps = g.kh * g.kw;
  const std::vector<float> masks = column_masks(g);
  const float* mp = masks.empty() ? nullptr : masks.data();
  at::parallel_for(0, g.n * g.cout, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t sample = plane / g.cout, co = plane % g.cout;
      float* out = yp + plane * out_plane;
      std::fill(out, out + out_plane, bp ? bp[co] : 0.f);
      for (int64_t ci = 0; ci < g.cin; ++ci) {
        const float* in = xp + (sample * g.cin + ci) * in_plane;
        conv_plane_forward(out, in, wp + (co * g.cin + ci) * taps, mp, g);
      }
    }
  });
  return y;
}

// Gradients of small_conv_forward: (grad_x, grad_weight, grad_bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> small_conv_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                                   const at::Tensor& weight, at::IntArrayRef padding,
                                                                   at::IntArrayRef dilation) {
  const ConvGeometry g = conv_geometry(x, weight, padding, dilation);
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.scalar_type() == at::kFloat &&
                  grad_out.sizes() == at::IntArrayRef({g.n, g.cout, g.ho, g.wo}),
              "small_conv: grad_out must be contiguous float32 of the output's shape");
  at::Tensor grad_x = at::zeros_like(x);
  const int64_t taps = g.kh * g.kw, wsize = g.cout * g.cin * taps;
  at::Tensor grad_w_parts = at::empty({g.n, wsize}, x.options());
  at::Tensor grad_b_parts = at::empty({g.n, g.cout}, x.options());
  const float* dyp = grad_out.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* dxp = grad_x.data_ptr<float>();
  float* dwp = grad_w_parts.data_ptr<float>();
  float* dbp = grad_b_parts.data_ptr<float>();
  const int64_t in_plane = g.h * g.w, out_plane = g.ho * g.wo;
  const std::vector<float> masks = column_masks(g);
  at::parallel_for(0, g.n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> masked_dy(masks.size());
    for (int64_t sample = begin; sample < end; ++sample) {
      for (int64_t co = 0; co < g.cout; ++co) {
        const float* dy = dyp + (sample * g.cout + co) * out_plane;
        float bsum = 0.f;
        for (int64_t k = 0; k < out_plane; ++k) bsum += dy[k];
        dbp[sample * g.cout + co] = bsum;
        for (size_t j = 0; j < masks.size(); j += out_plane)
          for (int64_t k = 0; k < out_plane; ++k) masked_dy[j + k] = masks[j + k] * dy[k];
        for (int64_t ci = 0; ci < g.cin; ++ci) {
          const float* in = xp + (sample * g.cin + ci) * in_plane;
          conv_plane_backward(dxp + (sample * g.cin + ci) * in_plane, dwp + sample * wsize + (co * g.cin + ci) * taps,
                              dy, in, wp + (co * g.cin + ci) * taps, masks.empty() ? nullptr : masked_dy.data(), g);
        }
      }
    }
  });
  return {grad_x, grad_w_parts.sum(0).view_as(weight), grad_b_parts.sum(0)};
}


// ---- The spatial branch of a small BAM in training, one call each way ------------------------------------
//
// With rd_channels of 1 or 2 (the CIFAR ResNets' BAMs) the spatial branch after its 1x1 reduction is a chain of
// BatchNorm (batch statistics) + ReLU and few-channel convolutions on maps of N x R x H x W, a few hundred KB.
// As modules it costs ~15 ATen calls and autograd nodes each way, and ATen's BatchNorm works channel by
// channel on one thread; here each layer is two or three passes over the map, parallel over samples.
//
//   pre_0 = reduced;  act_l = relu(bn_l(pre_l));  pre_{l+1} = conv_l(act_l);  logits = conv_final(act_last)

struct ChannelStats {
  std::vector<double> mean, var;  // per channel; var is the biased batch variance
};

// Plane sums in float (vectorised: omp simd reductions); planes are summed per channel in double.
BAM_ZOO_CLONES
double plane_sum(const float* __restrict p, int64_t len) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < len; ++i) s += p[i];
  return s;
}

BAM_ZOO_CLONES
double plane_squared_deviation(const float* __restrict p, float mean, int64_t len) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < len; ++i) s += (p[i] - mean) * (p[i] - mean);
  return s;
}

// Per-channel batch mean and biased variance of an N x R x HW map: two passes (mean, then squared deviations,
// so a large mean does not cancel the variance away), parallel over planes.
ChannelStats channel_stats(const float* in, int64_t n, int64_t r, int64_t hw) {
  std::vector<double> parts(n * r);
  ChannelStats st{std::vector<double>(r, 0.), std::vector<double>(r, 0.)};
  const double m = static_cast<double>(n * hw);
  auto per_channel = [&](std::vector<double>& out) {
    for (int64_t c = 0; c < r; ++c) {
      double s = 0.;
      for (int64_t i = 0; i < n; ++i) s += parts[i * r + c];
      out[c] = s / m;
    }
  };
  at::parallel_for(0, n * r, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) parts[plane] = plane_sum(in + plane * hw, hw);
  });
  per_channel(st.mean);
  at::parallel_for(0, n * r, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane)
      parts[plane] = plane_squared_deviation(in + plane * hw, static_cast<float>(st.mean[plane % r]), hw);
  });
  per_channel(st.var);
  return st;
}

// out = relu(x * scale[c] + shift[c]) per plane of an N x R x HW map.
BAM_ZOO_CLONES
void affine_relu(float* __restrict out, const float* __restrict in, float scale, float shift, int64_t len) {
  for (int64_t i = 0; i < len; ++i) out[i] = std::max(in[i] * scale + shift, 0.f);
}

// One BatchNorm (training, batch statistics) + ReLU layer: writes act, updates the running statistics as
// F.batch_norm does (unbiased variance), returns (mean, invstd) per channel as a 2 x R tensor.
at::Tensor bn_relu_train_forward(const at::Tensor& pre, at::Tensor& act, const at::Tensor& weight,
                                 const at::Tensor& bias, const at::Tensor& running_mean,
                                 const at::Tensor& running_var, double momentum, double eps) {
  const int64_t n = pre.size(0), r = pre.size(1), hw = pre.size(2) * pre.size(3);
  const ChannelStats st = channel_stats(pre.data_ptr<float>(), n, r, hw);
  at::Tensor stats = at::empty({2, r}, pre.options());
  float* mean_invstd = stats.data_ptr<float>();
  std::vector<float> scale(r), shift(r);
  const float* w = weight.data_ptr<float>();
  const float* b = bias.data_ptr<float>();
  float* rm = running_mean.data_ptr<float>();
  float* rv = running_var.data_ptr<float>();
  const double count = static_cast<double>(n * hw);
  for (int64_t c = 0; c < r; ++c) {
    const double invstd = 1. / std::sqrt(st.var[c] + eps);
    mean_invstd[c] = static_cast<float>(st.mean[c]);
    mean_invstd[r + c] = static_cast<float>(invstd);
    scale[c] = static_cast<float>(w[c] * invstd);
    shift[c] = static_cast<float>(b[c] - st.mean[c] * w[c] * invstd);
    rm[c] = static_cast<float>((1. - momentum) * rm[c] + momentum * st.mean[c]);
    rv[c] = static_cast<float>((1. - momentum) * rv[c] + momentum * st.var[c] * count / (count - 1.));
  }
  const float* in = pre.data_ptr<float>();
  float* out = act.data_ptr<float>();
  at::parallel_for(0, n * r, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t c = plane % r;
      affine_relu(out + plane * hw, in + plane * hw, scale[c], shift[c], hw);
    }
  });
  return stats;
}

// g = dact * (act > 0); returns the plane's sums of g and of g * (pre - mean).
BAM_ZOO_CLONES
void relu_mask_sums(float* __restrict g, const float* __restrict dact, const float* __restrict act,
                    const float* __restrict pre, float mean, int64_t len, double& sum_g, double& sum_gx) {
  float s = 0.f, sx = 0.f;
#pragma omp simd reduction(+ : s, sx)
  for (int64_t i = 0; i < len; ++i) {
    const float v = act[i] > 0.f ? dact[i] : 0.f;
    g[i] = v;
    s += v;
    sx += v * (pre[i] - mean);
  }
  sum_g = s;
  sum_gx = sx;
}

// dpre = k * (g - a - (pre - mean) * b), in place over g.
BAM_ZOO_CLONES
void bn_input_grad(float* __restrict g, const float* __restrict pre, float mean, float k, float a, float b,
                   int64_t len) {
  for (int64_t i = 0; i < len; ++i) g[i] = k * (g[i] - a - (pre[i] - mean) * b);
}

// Backward of bn_relu_train_forward: the input gradient (a new N x R x H x W tensor) and the BatchNorm's
// weight and bias gradients.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_train_backward(const at::Tensor& dact, const at::Tensor& act,
                                                                      const at::Tensor& pre, const at::Tensor& stats,
                                                                      const at::Tensor& weight) {
  const int64_t n = pre.size(0), r = pre.size(1), hw = pre.size(2) * pre.size(3);
  at::Tensor dpre = at::empty_like(pre);
  std::vector<double> parts(n * r * 2);
  const float* mean_invstd = stats.data_ptr<float>();
  const float* dap = dact.data_ptr<float>();
  const float* ap = act.data_ptr<float>();
  const float* pp = pre.data_ptr<float>();
  float* gp = dpre.data_ptr<float>();
  at::parallel_for(0, n * r, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t o = plane * hw;
      relu_mask_sums(gp + o, dap + o, ap + o, pp + o, mean_invstd[plane % r], hw, parts[plane * 2],
                     parts[plane * 2 + 1]);
    }
  });
  at::Tensor grad_weight = at::empty({r}, pre.options());
  at::Tensor grad_bias = at::empty({r}, pre.options());
  std::vector<float> k(r), a(r), b(r);
  const float* w = weight.data_ptr<float>();
  const double count = static_cast<double>(n * hw);
  for (int64_t c = 0; c < r; ++c) {
    double sum_g = 0., sum_gx = 0.;
    for (int64_t i = 0; i < n; ++i) {
      sum_g += parts[(i * r + c) * 2];
      sum_gx += parts[(i * r + c) * 2 + 1];
    }
    const double invstd = mean_invstd[r + c];
    grad_bias.data_ptr<float>()[c] = static_cast<float>(sum_g);
    grad_weight.data_ptr<float>()[c] = static_cast<float>(sum_gx * invstd);
    k[c] = static_cast<float>(w[c] * invstd);
    a[c] = static_cast<float>(sum_g / count);
    b[c] = static_cast<float>(sum_gx * invstd * invstd / count);
  }
  at::parallel_for(0, n * r, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t c = plane % r;
      bn_input_grad(gp + plane * hw, pp + plane * hw, mean_invstd[c], k[c], a[c], b[c], hw);
    }
  });
  return {dpre, grad_weight, grad_bias};
}

void check_body(const at::Tensor& reduced, at::TensorList bn_weight, at::TensorList conv_weight) {
  TORCH_CHECK(reduced.dim() == 4 && reduced.is_contiguous() && reduced.scalar_type() == at::kFloat &&
                  reduced.device().is_cpu() && reduced.size(0) * reduced.size(2) * reduced.size(3) > 1,
              "spatial_body: reduced must be a contiguous N x R x H x W float32 CPU map of more than one value");
  TORCH_CHECK(bn_weight.size() == conv_weight.size() + 1,
              "spatial_body: one BatchNorm more than dilated convolutions is expected");
  for (const at::Tensor& t : bn_weight)
    TORCH_CHECK(t.is_contiguous() && t.scalar_type() == at::kFloat && t.numel() == reduced.size(1),
                "spatial_body: BatchNorm parameters must hold R contiguous float32 values");
}

// The branch's forward: (logits, conv outputs pre_1.., activations act_0.., per-layer (mean, invstd)).
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
spatial_body_forward(const at::Tensor& reduced, at::TensorList bn_weight, at::TensorList bn_bias,
                     at::TensorList running_mean, at::TensorList running_var, at::ArrayRef<double> momentum,
                     at::ArrayRef<double> eps, at::TensorList conv_weight, const at::Tensor& final_weight,
                     const c10::optional<at::Tensor>& final_bias, at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_body(reduced, bn_weight, conv_weight);
  const size_t layers = bn_weight.size();
  TORCH_CHECK(bn_bias.size() == layers && running_mean.size() == layers && running_var.size() == layers &&
                  momentum.size() == layers && eps.size() == layers,
              "spatial_body: every BatchNorm needs weight, bias, running statistics, momentum and eps");
  std::vector<at::Tensor> pres, acts, stats;
  at::Tensor pre = reduced;
  for (size_t l = 0; l < layers; ++l) {
    at::Tensor act = at::empty_like(pre);
    stats.push_back(bn_relu_train_forward(pre, act, bn_weight[l], bn_bias[l], running_mean[l], running_var[l],
                                          momentum[l], eps[l]));
    acts.push_back(act);
    if (l + 1 < layers) {
      pre = small_conv_forward(act, conv_weight[l], c10::nullopt, padding, dilation);
      pres.push_back(pre);
    }
  }
  const std::vector<int64_t> no_padding{0, 0}, no_dilation{1, 1};
  at::Tensor logits = small_conv_forward(acts.back(), final_weight, final_bias, no_padding, no_dilation);
  return {logits, pres, acts, stats};
}

// The branch's backward: (grad_reduced, BatchNorm weight grads, bias grads, conv weight grads, final weight
// grad, final bias grad).
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor,
           at::Tensor>
spatial_body_backward(const at::Tensor& grad_logits, const at::Tensor& reduced, at::TensorList pres,
                      at::TensorList acts, at::TensorList stats, at::TensorList bn_weight,
                      at::TensorList conv_weight, const at::Tensor& final_weight, at::IntArrayRef padding,
                      at::IntArrayRef dilation) {
  check_body(reduced, bn_weight, conv_weight);
  const size_t layers = bn_weight.size();
  TORCH_CHECK(acts.size() == layers && stats.size() == layers && pres.size() + 1 == layers,
              "spatial_body: the saved tensors do not match the layers");
  const std::vector<int64_t> no_padding{0, 0}, no_dilation{1, 1};
  auto final_grads = small_conv_backward(grad_logits.contiguous(), acts.back(), final_weight, no_padding,
                                         no_dilation);
  at::Tensor dact = std::get<0>(final_grads);
  std::vector<at::Tensor> grad_bn_weight(layers), grad_bn_bias(layers), grad_conv(conv_weight.size());
  at::Tensor dpre;
  for (size_t l = layers; l-- > 0;) {
    const at::Tensor& pre = l == 0 ? reduced : pres[l - 1];
    std::tie(dpre, grad_bn_weight[l], grad_bn_bias[l]) = bn_relu_train_backward(dact, acts[l], pre, stats[l],
                                                                                bn_weight[l]);
    if (l > 0) {
      auto conv_grads = small_conv_backward(dpre, acts[l - 1], conv_weight[l - 1], padding, dilation);
      dact = std::get<0>(conv_grads);
      grad_conv[l - 1] = std::get<1>(conv_grads);
    }
  }
  return {dpre, grad_bn_weight, grad_bn_bias, grad_conv, std::get<1>(final_grads), std::get<2>(final_grads)};
}


// ---- The pool and the 1x1 reduction of a channels_last map with few reduced channels, one pass each way --------
//
// BAM reads its input for the channel branch's global average pool and for the spatial branch's 1x1 reduction,
// and its backward adds both input gradients into dx and needs x again for the reduction's weight gradient. As a
// GEMM and a sum these are separate passes over the full map; with one or two reduced channels each pixel's row
// of C values (contiguous in channels_last) serves all of them at once.

constexpr int64_t kPixelBlock = 8;  // rows summed into the pool (and the weight gradient) per memory update

// One sample's rows (hw x C): pooled (C) += sum of the rows; red[r * hw + p] = row_p . w_r + b_r.
BAM_ZOO_CLONES
void pool_reduce_sample(float* __restrict pooled, float* __restrict red, const float* __restrict rows,
                        const float* __restrict w, const float* __restrict b, int64_t c, int64_t rd, int64_t hw) {
  int64_t p = 0;
  for (; p + kPixelBlock <= hw; p += kPixelBlock) {
    const float* x = rows + p * c;
    for (int64_t k = 0; k < c; ++k) {
      float s = 0.f;
      for (int64_t j = 0; j < kPixelBlock; ++j) s += x[j * c + k];
      pooled[k] += s;
    }
  }
  for (; p < hw; ++p)
    for (int64_t k = 0; k < c; ++k) pooled[k] += rows[p * c + k];
  for (int64_t r = 0; r < rd; ++r) {
    const float* wr = w + r * c;
    const float bias = b ? b[r] : 0.f;
    for (int64_t q = 0; q < hw; ++q) {
      const float* x = rows + q * c;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < c; ++k) acc += x[k] * wr[k];
      red[r * hw + q] = acc + bias;
    }
  }
}

void check_reduce_weight(const at::Tensor& weight, int64_t c, const char* op) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == c && weight.is_contiguous() &&
                  weight.scalar_type() == at::kFloat,
              op, ": weight must be a contiguous float32 rd x C matrix");
}

// x: N x C x H x W channels_last; weight: rd x C contiguous. Returns (mean over H x W: N x C, the reduction:
// N x rd x H x W contiguous).
std::tuple<at::Tensor, at::Tensor> pool_reduce(const at::Tensor& x, const at::Tensor& weight,
                                               const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu() &&
                  x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "pool_reduce: x must be a channels_last N x C x H x W float32 CPU tensor");
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  check_reduce_weight(weight, c, "pool_reduce");
  const int64_t rd = weight.size(0);
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->is_contiguous() && bias->scalar_type() == at::kFloat && bias->numel() == rd,
                "pool_reduce: bias must hold rd float32 values");
    bp = bias->data_ptr<float>();
  }
  at::Tensor pooled = at::zeros({n, c}, x.options());
  at::Tensor red = at::empty({n, rd, x.size(2), x.size(3)}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* pp = pooled.data_ptr<float>();
  float* rp = red.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* pooled_i = pp + i * c;
      pool_reduce_sample(pooled_i, rp + i * rd * hw, xp + i * hw * c, wp, bp, c, rd, hw);
      for (int64_t k = 0; k < c; ++k) pooled_i[k] /= static_cast<float>(hw);
    }
  });
  return {pooled, red};
}

// One sample: dx_p += sum_r dred[r * hw + p] w_r + dpool for every row p; dw_r += sum_p dred[r * hw + p] x_p.
BAM_ZOO_CLONES
void reduce_backward_sample(float* __restrict dx, float* __restrict dw, const float* __restrict rows,
                            const float* __restrict dred, const float* __restrict w, const float* __restrict dpool,
                            int64_t c, int64_t rd, int64_t hw) {
  for (int64_t p = 0; p < hw; ++p) {
    float* d = dx + p * c;
    for (int64_t k = 0; k < c; ++k) d[k] += dpool[k];
    for (int64_t r = 0; r < rd; ++r) {
      const float g = dred[r * hw + p];
      const float* wr = w + r * c;
      for (int64_t k = 0; k < c; ++k) d[k] += g * wr[k];
    }
  }
  for (int64_t r = 0; r < rd; ++r) {
    const float* g = dred + r * hw;
    float* dwr = dw + r * c;
    int64_t p = 0;
    for (; p + kPixelBlock <= hw; p += kPixelBlock) {
      const float* x = rows + p * c;
      for (int64_t k = 0; k < c; ++k) {
        float s = 0.f;
        for (int64_t j = 0; j < kPixelBlock; ++j) s += g[p + j] * x[j * c + k];
        dwr[k] += s;
      }
    }
    for (; p < hw; ++p)
      for (int64_t k = 0; k < c; ++k) dwr[k] += g[p] * rows[p * c + k];
  }
}

// Adds the pool's and the reduction's input gradients into grad_x (channels_last, in place): grad_x +=
// dred @ W + dpool (dpool: N x C, already divided by H x W). Returns the weight's gradient (rd x C).
at::Tensor pool_reduce_backward_(at::Tensor& grad_x, const at::Tensor& x, const at::Tensor& grad_reduced,
                                 const at::Tensor& weight, const at::Tensor& grad_pooled) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) && x.scalar_type() == at::kFloat &&
                  grad_x.sizes() == x.sizes() && grad_x.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                  grad_x.scalar_type() == at::kFloat,
              "pool_reduce_backward_: x and grad_x must be channels_last float32 maps of one shape");
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  check_reduce_weight(weight, c, "pool_reduce_backward_");
  const int64_t rd = weight.size(0);
  TORCH_CHECK(grad_reduced.is_contiguous() && grad_reduced.scalar_type() == at::kFloat &&
                  grad_reduced.numel() == n * rd * hw,
              "pool_reduce_backward_: grad_reduced must be a contiguous N x rd x H x W float32 map");
  TORCH_CHECK(grad_pooled.is_contiguous() && grad_pooled.scalar_type() == at::kFloat && grad_pooled.numel() == n * c,
              "pool_reduce_backward_: grad_pooled must be a contiguous N x C float32 matrix");
  at::Tensor parts = at::zeros({n, rd, c}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* gp = grad_reduced.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* dpp = grad_pooled.data_ptr<float>();
  float* dxp = grad_x.data_ptr<float>();
  float* dwp = parts.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      reduce_backward_sample(dxp + i * hw * c, dwp + i * rd * c, xp + i * hw * c, gp + i * rd * hw, wp, dpp + i * c,
                             c, rd, hw);
  });
  return parts.sum(0);
}

}  // namespace

TORCH_LIBRARY(bam_zoo, m) {
  m.def("gate_forward(Tensor x, Tensor a, Tensor b) -> Tensor");
  m.def("gate_backward(Tensor grad_out, Tensor x, Tensor a, Tensor b) -> (Tensor, Tensor, Tensor)");
  m.def("small_conv_forward(Tensor x, Tensor weight, Tensor? bias, int[] padding, int[] dilation) -> Tensor");
  m.def("small_conv_backward(Tensor grad_out, Tensor x, Tensor weight, int[] padding, int[] dilation)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("spatial_body_forward(Tensor reduced, Tensor[] bn_weight, Tensor[] bn_bias, Tensor(a!)[] running_mean,"
        " Tensor(b!)[] running_var, float[] momentum, float[] eps, Tensor[] conv_weight, Tensor final_weight,"
        " Tensor? final_bias, int[] padding, int[] dilation) -> (Tensor, Tensor[], Tensor[], Tensor[])");
  m.def("spatial_body_backward(Tensor grad_logits, Tensor reduced, Tensor[] pres, Tensor[] acts, Tensor[] stats,"
        " Tensor[] bn_weight, Tensor[] conv_weight, Tensor final_weight, int[] padding, int[] dilation)"
        " -> (Tensor, Tensor[], Tensor[], Tensor[], Tensor, Tensor)");
  m.def("pool_reduce(Tensor x, Tensor weight, Tensor? bias) -> (Tensor, Tensor)");
  m.def("pool_reduce_backward_(Tensor(a!) grad_x, Tensor x, Tensor grad_reduced, Tensor weight, Tensor grad_pooled)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(bam_zoo, CPU, m) {
  m.impl("gate_forward", &gate_forward);
  m.impl("gate_backward", &gate_backward);
  m.impl("small_conv_forward", &small_conv_forward);
  m.impl("small_conv_backward", &small_conv_backward);
  m.impl("spatial_body_forward", &spatial_body_forward);
  m.impl("spatial_body_backward", &spatial_body_backward);
  m.impl("pool_reduce", &pool_reduce);
  m.impl("pool_reduce_backward_", &pool_reduce_backward_);
}

// An importable (empty) Python module, so `import bam_zoo._native` loads the library and registers the ops.
static struct PyModuleDef native_module = {PyModuleDef_HEAD_INIT, "_native",
                                           "Fused CPU kernels of bam_zoo, registered as torch.ops.bam_zoo.*", -1,
                                           nullptr};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&native_module); }
