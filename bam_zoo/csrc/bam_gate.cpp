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

#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/Allocator.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <new>

#include <sys/mman.h>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
// An AVX-512, an AVX2+FMA and a baseline copy of each row kernel, picked at load time by the CPU.
#define BAM_ZOO_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=haswell", "default")))
#else
#define BAM_ZOO_CLONES
#endif

namespace {

// ---- A small cache for the full-size buffers the gate kernels return -------------------------------------
//
// A fresh 12.8 MB tensor costs about 3 ms of page faults on first touch on this class of machine (a reused
// one: 0.3 ms), more than the gate's arithmetic. glibc hands such blocks back to the OS when they are freed,
// so every training step faults them in again. The gate's output and input gradient are allocated here
// instead: a freed block is kept (up to a byte limit) and handed out again for the next request of exactly
// its size, as PyTorch's CUDA caching allocator does. Allocations and frees are reported to the profiler like
// the CPU allocator's, so torch.profiler's memory view (and bam_zoo.benchmark's peak) still count them.

class BufferCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    void* ptr = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        ptr = it->second.back();
        it->second.pop_back();
        cached_bytes_ -= bytes;
      }
      allocated_bytes_ += bytes;
    }
    if (ptr == nullptr) ptr = map_pages(bytes);
    report(ptr, static_cast<int64_t>(bytes));
    return {ptr, new Block{ptr, bytes}, &BufferCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void set_limit(int64_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    limit_bytes_ = static_cast<size_t>(std::max<int64_t>(0, bytes));
    trim_locked();
  }

  void empty() {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t limit = limit_bytes_;
    limit_bytes_ = 0;
    trim_locked();
    limit_bytes_ = limit;
  }

  std::vector<int64_t> info() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(allocated_bytes_), static_cast<int64_t>(cached_bytes_),
            static_cast<int64_t>(limit_bytes_)};
  }

  static BufferCache& instance() {
    static BufferCache* cache = new BufferCache();  // never destroyed: tensors may outlive static destructors
    return *cache;
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };

  // Straight from the kernel, not through malloc: blocks that live across steps would otherwise change
  // glibc's heap and its adaptive mmap threshold, and with them the page faults of every other tensor.
  static void* map_pages(size_t bytes) {
    void* ptr = mmap(nullptr, std::max<size_t>(bytes, 1), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (ptr == MAP_FAILED) throw std::bad_alloc();
    return ptr;
  }

  static void release(void* ctx) {
    auto* block = static_cast<Block*>(ctx);
    instance().give_back(block->ptr, block->bytes);
    delete block;
  }

  void give_back(void* ptr, size_t bytes) {
    report(ptr, -static_cast<int64_t>(bytes));
    {
      std::lock_guard<std::mutex> lock(mutex_);
      allocated_bytes_ -= bytes;
      if (cached_bytes_ + bytes <= limit_bytes_) {
        free_[bytes].push_back(ptr);
        cached_bytes_ += bytes;
        return;
      }
    }
    munmap(ptr, std::max<size_t>(bytes, 1));
  }

  void trim_locked() {
    for (auto it = free_.begin(); it != free_.end() && cached_bytes_ > limit_bytes_; ++it) {
      while (!it->second.empty() && cached_bytes_ > limit_bytes_) {
        munmap(it->second.back(), std::max<size_t>(it->first, 1));
        it->second.pop_back();
        cached_bytes_ -= it->first;
      }
    }
  }

  void report(void* ptr, int64_t delta) {
    if (c10::memoryProfilingEnabled()) {
      size_t allocated, cached;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        allocated = allocated_bytes_;
        cached = cached_bytes_;
      }
      c10::reportMemoryUsageToProfiler(ptr, delta, allocated, allocated + cached,
                                       c10::Device(c10::DeviceType::CPU));
    }
  }

  std::mutex mutex_;
  std::map<size_t, std::vector<void*>> free_;
  size_t allocated_bytes_ = 0, cached_bytes_ = 0;
  size_t limit_bytes_ = size_t(256) << 20;
};

// A float32 tensor of x's shape and memory format (contiguous or channels_last) from the cache.
at::Tensor cached_empty_like(const at::Tensor& x, c10::MemoryFormat format) {
  return at::detail::empty_generic(x.sizes(), &BufferCache::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   x.scalar_type(), format);
}

void buffer_cache_set_limit(int64_t bytes) { BufferCache::instance().set_limit(bytes); }
void buffer_cache_empty() { BufferCache::instance().empty(); }
std::vector<int64_t> buffer_cache_info() { return BufferCache::instance().info(); }

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
  at::Tensor out = cached_empty_like(x, format);
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
  at::Tensor grad_x = cached_empty_like(x, format);
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

// out (one output plane) += conv(in (one input plane), wk (that pair's kh x kw taps))
BAM_ZOO_CLONES
void conv_plane_forward(float* __restrict out, const float* __restrict in, const float* __restrict wk,
                        const ConvGeometry& g) {
  for_each_tap(g, [&](int64_t oi, int64_t oj, int64_t r0, int64_t r1, int64_t c0, int64_t c1, int64_t t) {
    for (int64_t r = r0; r < r1; ++r) axpy(out + r * g.wo + c0, in + (r + oi) * g.w + c0 + oj, wk[t], c1 - c0);
  });
}

// For one (output, input) plane pair: dx += conv_transpose(dy, wk); dwk = correlation of dy and in.
BAM_ZOO_CLONES
void conv_plane_backward(float* __restrict dx, float* __restrict dwk, const float* __restrict dy,
                         const float* __restrict in, const float* __restrict wk, const ConvGeometry& g) {
  std::fill(dwk, dwk + g.kh * g.kw, 0.f);  // taps that never overlap the input keep a zero gradient
  for_each_tap(g, [&](int64_t oi, int64_t oj, int64_t r0, int64_t r1, int64_t c0, int64_t c1, int64_t t) {
    float acc = 0.f;
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
  at::parallel_for(0, g.n * g.cout, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t sample = plane / g.cout, co = plane % g.cout;
      float* out = yp + plane * out_plane;
      std::fill(out, out + out_plane, bp ? bp[co] : 0.f);
      for (int64_t ci = 0; ci < g.cin; ++ci) {
        const float* in = xp + (sample * g.cin + ci) * in_plane;
        conv_plane_forward(out, in, wp + (co * g.cin + ci) * taps, g);
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
  at::parallel_for(0, g.n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t sample = begin; sample < end; ++sample) {
      for (int64_t co = 0; co < g.cout; ++co) {
        const float* dy = dyp + (sample * g.cout + co) * out_plane;
        float bsum = 0.f;
        for (int64_t k = 0; k < out_plane; ++k) bsum += dy[k];
        dbp[sample * g.cout + co] = bsum;
        for (int64_t ci = 0; ci < g.cin; ++ci) {
          const float* in = xp + (sample * g.cin + ci) * in_plane;
          conv_plane_backward(dxp + (sample * g.cin + ci) * in_plane, dwp + sample * wsize + (co * g.cin + ci) * taps,
                              dy, in, wp + (co * g.cin + ci) * taps, g);
        }
      }
    }
  });
  return {grad_x, grad_w_parts.sum(0).view_as(weight), grad_b_parts.sum(0)};
}

}  // namespace

TORCH_LIBRARY(bam_zoo, m) {
  m.def("gate_forward(Tensor x, Tensor a, Tensor b) -> Tensor");
  m.def("gate_backward(Tensor grad_out, Tensor x, Tensor a, Tensor b) -> (Tensor, Tensor, Tensor)");
  m.def("buffer_cache_set_limit(int bytes) -> ()");
  m.def("buffer_cache_empty() -> ()");
  m.def("buffer_cache_info() -> int[]");
  m.def("small_conv_forward(Tensor x, Tensor weight, Tensor? bias, int[] padding, int[] dilation) -> Tensor");
  m.def("small_conv_backward(Tensor grad_out, Tensor x, Tensor weight, int[] padding, int[] dilation)"
        " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bam_zoo, CompositeExplicitAutograd, m) {
  m.impl("buffer_cache_set_limit", &buffer_cache_set_limit);
  m.impl("buffer_cache_empty", &buffer_cache_empty);
  m.impl("buffer_cache_info", &buffer_cache_info);
}

TORCH_LIBRARY_IMPL(bam_zoo, CPU, m) {
  m.impl("gate_forward", &gate_forward);
  m.impl("gate_backward", &gate_backward);
  m.impl("small_conv_forward", &small_conv_forward);
  m.impl("small_conv_backward", &small_conv_backward);
}

// An importable (empty) Python module, so `import bam_zoo._native` loads the library and registers the ops.
static struct PyModuleDef native_module = {PyModuleDef_HEAD_INIT, "_native",
                                           "Fused CPU kernels of bam_zoo, registered as torch.ops.bam_zoo.*", -1,
                                           nullptr};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&native_module); }
