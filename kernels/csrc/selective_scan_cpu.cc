// The `cpu_ffi` selective-scan core: forward and backward kernels for XLA's CPU backend through the XLA FFI.
//
// The core computes, in float32, h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t and y_t = <h_t, C_t> on
// channels-last arrays (u, delta, y: (batch, length, channels); A: (channels, state); B, C: (batch, length,
// state); states: (batch, channels, state)). Everything else of the selective scan (mask, bias, softplus, D,
// silu(z)) is done around it in Python (common.make_backend).
//
// Layout of the work: one task is (batch row, block of 8 channels). Inside a task the 8 channels sit in the
// lanes of one vector, time runs sequentially and the state is `state` vectors (on the stack, so mostly in
// registers, when state == 16; on the heap otherwise). A fast vector exp replaces expf. Tasks run on XLA's intra-op thread pool (the FFI ThreadPool;
// where XLA gives none the calling thread runs them all), the calling thread taking tasks too.
//
// Forward: writes y, h_last and the state at the start of every chunk of `chunk` steps (h_starts, the only
// thing the backward pass keeps; the forward without differentiation passes chunk = length).
// Backward: per chunk, from last to first, recomputes the chunk's states and exp(delta A) from its boundary
// state into a per-task scratch of chunk x state vectors, then runs the adjoint recurrence backwards
// (g_t = exp(delta_{t+1} A) g_{t+1} + C_t dy_t) forming every gradient. dB and dC sum over channels, so each
// task of group `g` (a contiguous range of channel blocks) accumulates into its own slice of dB_part / dC_part
// (groups, batch, length, state) and dA into dA_part (batch, channels, state); the caller sums those.
//
// Portability: no -march flag; on x86-64 the two task functions are compiled for x86-64-v4 (AVX-512), -v3
// (AVX2+FMA) and the baseline, and the loader picks one by the CPU's features (GCC/Clang target_clones; the
// arch=<cpu model> form would dispatch on the model name and give an AMD EPYC the baseline). The vectors are GCC vector
// extensions of 8 floats (one AVX register; GCC scalarizes compares of wider ones on AVX2).
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 8;
// Aligned explicitly: the baseline target would give these types only 16-byte alignment, the AVX ones 32.
typedef float vf __attribute__((vector_size(kLanes * sizeof(float)), aligned(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t)), aligned(kLanes * sizeof(int32_t))));

#define ALWAYS_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__)
#define MULTI_TARGET __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTI_TARGET
#endif

ALWAYS_INLINE vf splat(float x) { return vf{} + x; }

constexpr float kLog2e = 1.44269504088896341f;

// 2^x for float32 lanes (so exp(x) = exp2(x * log2(e)), the factor folded into A once per task):
// 2^k * 2^f with k = round(x), |f| <= 1/2, 2^f = 1 + f P(f) (Cephes exp2f, degree 5): within 1.2 ulp of exp2
// for x in [-126, 127] (checked over 720k points, FMA and non-FMA builds). The exponent field saturates instead
// of wrapping: below x = -126.5 the result is 0 (no denormals), from 127.5 on inf; NaN stays NaN.
ALWAYS_INLINE vf vexp2(vf x) {
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: x + magic rounds x to an integer k in the low bits
  const vf shifted = x + magic;
  const vf k = shifted - magic;
  const vf f = x - k;
  vf p = splat(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  // The biased exponent k + 127, read from the bits of x + magic (0x4B400000 + k); outside |k| < 2^22, and for
  // NaN, those bits land below 0 or above 255 on the side of the true result.
  vi e = (vi)shifted - (0x4B400000 - 127);
  e = e < 0 ? 0 : e;
  e = e > 255 ? 255 : e;
  return p * (vf)(e << 23);  // (vf) reinterprets the bits
}

// Loads and stores of `width` <= kLanes consecutive floats; missing lanes read as 0.
ALWAYS_INLINE vf load(const float* p, int width) {
  vf v = {};
  if (width == kLanes) {
    std::memcpy(&v, p, sizeof(vf));
  } else {
    std::memcpy(&v, p, width * sizeof(float));
  }
  return v;
}

ALWAYS_INLINE void store(float* p, vf v, int width) {
  if (width == kLanes) {
    std::memcpy(p, &v, sizeof(vf));
  } else {
    std::memcpy(p, &v, width * sizeof(float));
  }
}

// A (channels, state) slice starting at channel c0 (`src` points at it) <-> `state` vectors of channel lanes.
ALWAYS_INLINE void load_transposed(vf* dst, const float* src, int64_t state, int width) {
  for (int64_t n = 0; n < state; ++n) {
    vf v = {};
    for (int lane = 0; lane < width; ++lane) v[lane] = src[lane * state + n];
    dst[n] = v;
  }
}

ALWAYS_INLINE void store_transposed(float* dst, const vf* src, int64_t state, int width) {
  for (int64_t n = 0; n < state; ++n)
    for (int lane = 0; lane < width; ++lane) dst[lane * state + n] = src[n][lane];
}

// One step of the lane-sum tree: lanes whose bit log2(h) is 0 keep x's pairwise sums, the others y's.
template <int h>
ALWAYS_INLINE vf fold(vf x, vf y) {
  vi take_low, take_high;
  for (int i = 0; i < kLanes; ++i) {
    bool from_x = (i / h) % 2 == 0;
    take_low[i] = from_x ? i : kLanes + i - h;
    take_high[i] = from_x ? i + h : kLanes + i;
  }
  return __builtin_shuffle(x, y, take_low) + __builtin_shuffle(x, y, take_high);
}

// dst[n] += sum over lanes of v[n] for n < count (<= 8): 7 folds instead of 8 separate lane sums.
ALWAYS_INLINE void add_lane_sums(float* dst, const vf* v, int count) {
  vf w[kLanes];
  for (int i = 0; i < kLanes; ++i) w[i] = i < count ? v[i] : vf{};
  for (int i = 0; i < 4; ++i) w[i] = fold<4>(w[i], w[i + 4]);
  for (int i = 0; i < 2; ++i) w[i] = fold<2>(w[i], w[i + 2]);
  w[0] = fold<1>(w[0], w[1]);
  store(dst, load(dst, count) + w[0], count);
}

// `state` vectors: on the stack (registers) when the state size is known at compile time, else on the heap.
template <int kState>
struct Vectors {
  explicit Vectors(int64_t) {}
  vf* get() { return data; }
  vf data[kState];
};

// (Not std::vector<vf>: a template argument drops vf's alignment attribute.)
template <>
struct Vectors<0> {
  explicit Vectors(int64_t n)
      : data(std::aligned_alloc(alignof(vf), std::max<int64_t>(n, 1) * sizeof(vf)), &std::free) {}
  vf* get() { return static_cast<vf*>(data.get()); }
  std::unique_ptr<void, decltype(&std::free)> data;
};

struct Shape {
  int64_t batch, length, channels, state, chunk;
  int64_t blocks() const { return (channels + kLanes - 1) / kLanes; }
  int64_t chunks() const { return (length + chunk - 1) / chunk; }
  int width(int64_t block) const { return static_cast<int>(std::min<int64_t>(kLanes, channels - block * kLanes)); }
};

struct ForwardArgs {
  Shape s;
  const float *u, *delta, *A, *B, *C, *h0;
  float *y, *h_last, *h_starts;
};

struct BackwardArgs {
  Shape s;
  int64_t groups;
  const float *u, *delta, *A, *B, *C, *h_starts, *dy, *dh_last;
  float *du, *ddelta, *dA_part, *dB_part, *dC_part, *dh0;
};

template <int kState>
ALWAYS_INLINE void forward_block(const ForwardArgs& p, int64_t b, int64_t block) {
  const Shape& s = p.s;
  const int64_t N = kState ? kState : s.state;
  const int64_t c0 = block * kLanes;
  const int width = s.width(block);
  Vectors<kState> A_storage(N), h_storage(N);
  vf* A = A_storage.get();
  vf* h = h_storage.get();
  load_transposed(A, p.A + c0 * N, N, width);
  for (int64_t n = 0; n < N; ++n) A[n] *= kLog2e;
  load_transposed(h, p.h0 + (b * s.channels + c0) * N, N, width);
  for (int64_t t = 0; t < s.length; ++t) {
    if (t % s.chunk == 0)
      store_transposed(p.h_starts + ((t / s.chunk * s.batch + b) * s.channels + c0) * N, h, N, width);
    const int64_t at = (b * s.length + t) * s.channels + c0;
    const vf d = load(p.delta + at, width);
    const vf du = d * load(p.u + at, width);
    const float* B = p.B + (b * s.length + t) * N;
    const float* C = p.C + (b * s.length + t) * N;
    vf y = {};
    for (int64_t n = 0; n < N; ++n) {
      h[n] = vexp2(d * A[n]) * h[n] + du * B[n];
      y += h[n] * C[n];
    }
    store(p.y + at, y, width);
  }
  store_transposed(p.h_last + (b * s.channels + c0) * N, h, N, width);
}

template <int kState>
ALWAYS_INLINE void backward_block(const BackwardArgs& p, int64_t b, int64_t block, float* dB, float* dC,
                                  vf* states, vf* decays) {
  const Shape& s = p.s;
  const int64_t N = kState ? kState : s.state;
  const int64_t c0 = block * kLanes;
  const int width = s.width(block);
  Vectors<kState> A_storage(N), A2_storage(N), g_storage(N), dA_storage(N), dB_storage(N), dC_storage(N);
  vf *A = A_storage.get(), *A2 = A2_storage.get(), *g = g_storage.get(), *dA = dA_storage.get();
  vf *dB_lanes = dB_storage.get(), *dC_lanes = dC_storage.get();
  load_transposed(A, p.A + c0 * N, N, width);
  for (int64_t n = 0; n < N; ++n) A2[n] = A[n] * kLog2e;
  load_transposed(g, p.dh_last + (b * s.channels + c0) * N, N, width);
  for (int64_t n = 0; n < N; ++n) dA[n] = vf{};
  for (int64_t chunk = s.chunks() - 1; chunk >= 0; --chunk) {
    const int64_t t0 = chunk * s.chunk, steps = std::min(s.chunk, s.length - t0);
    // states[i] is the state before step t0 + i (states[0] the saved boundary), decays[i] its exp(delta A)
    load_transposed(states, p.h_starts + ((chunk * s.batch + b) * s.channels + c0) * N, N, width);
    for (int64_t i = 0; i < steps; ++i) {
      const int64_t at = (b * s.length + t0 + i) * s.channels + c0;
      const vf d = load(p.delta + at, width);
      const vf du = d * load(p.u + at, width);
      const float* B = p.B + (b * s.length + t0 + i) * N;
      for (int64_t n = 0; n < N; ++n) {
        const vf a = vexp2(d * A2[n]);
        decays[i * N + n] = a;
        states[(i + 1) * N + n] = a * states[i * N + n] + du * B[n];
      }
    }
    for (int64_t i = steps - 1; i >= 0; --i) {
      const int64_t t = t0 + i;
      const int64_t at = (b * s.length + t) * s.channels + c0;
      const vf d = load(p.delta + at, width);
      const vf u = load(p.u + at, width);
      const vf dy = load(p.dy + at, width);
      const vf du = d * u;
      const float* B = p.B + (b * s.length + t) * N;
      const float* C = p.C + (b * s.length + t) * N;
      vf g_dot_B = {}, g_a_h_dot_A = {};
      for (int64_t n = 0; n < N; ++n) {
        const vf a = decays[i * N + n];
        const vf g_total = g[n] + dy * C[n];  // the adjoint of h_t
        const vf g_a_h = g_total * a * states[i * N + n];
        dA[n] += g_a_h * d;
        g_a_h_dot_A += g_a_h * A[n];
        g_dot_B += g_total * B[n];
        dB_lanes[n] = g_total * du;
        dC_lanes[n] = states[(i + 1) * N + n] * dy;
        g[n] = a * g_total;  // the adjoint of h_{t-1} through step t
      }
      for (int64_t n0 = 0; n0 < N; n0 += kLanes) {
        const int count = static_cast<int>(std::min<int64_t>(kLanes, N - n0));
        add_lane_sums(dB + t * N + n0, dB_lanes + n0, count);
        add_lane_sums(dC + t * N + n0, dC_lanes + n0, count);
      }
      store(p.ddelta + at, g_a_h_dot_A + u * g_dot_B, width);
      store(p.du + at, d * g_dot_B, width);
    }
  }
  store_transposed(p.dh0 + (b * s.channels + c0) * N, g, N, width);
  store_transposed(p.dA_part + (b * s.channels + c0) * N, dA, N, width);
}

MULTI_TARGET void forward_task(const ForwardArgs& p, int64_t task) {
  const int64_t b = task / p.s.blocks(), block = task % p.s.blocks();
  if (p.s.state == 16) {
    forward_block<16>(p, b, block);
  } else {
    forward_block<0>(p, b, block);
  }
}

// Task = (group, batch row): the group's channel blocks, accumulating into its own dB / dC slice.
MULTI_TARGET void backward_task(const BackwardArgs& p, int64_t task) {
  const Shape& s = p.s;
  const int64_t group = task / s.batch, b = task % s.batch;
  const int64_t first = group * s.blocks() / p.groups, last = (group + 1) * s.blocks() / p.groups;
  const int64_t slice = (group * s.batch + b) * s.length * s.state;
  float* dB = p.dB_part + slice;
  float* dC = p.dC_part + slice;
  std::fill(dB, dB + s.length * s.state, 0.0f);
  std::fill(dC, dC + s.length * s.state, 0.0f);
  Vectors<0> states((s.chunk + 1) * s.state), decays(s.chunk * s.state);
  for (int64_t block = first; block < last; ++block) {
    if (s.state == 16) {
      backward_block<16>(p, b, block, dB, dC, states.get(), decays.get());
    } else {
      backward_block<0>(p, b, block, dB, dC, states.get(), decays.get());
    }
  }
}

// Runs body(0..count-1) on the pool's threads and the calling thread; returns when all are done. Helpers that
// start after every task is taken return at once without touching `body` (they hold only the shared counters).
template <typename Body>
void parallel_for(ffi::ThreadPool& pool, int64_t count, const Body& body) {
  struct Progress {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mutex;
    std::condition_variable all_done;
  };
  auto progress = std::make_shared<Progress>();
  auto work = [progress, count, &body]() {
    for (int64_t task; (task = progress->next.fetch_add(1)) < count;) {
      body(task);
      if (progress->done.fetch_add(1) + 1 == count) {
        std::lock_guard<std::mutex> lock(progress->mutex);
        progress->all_done.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(progress->mutex);
  progress->all_done.wait(lock, [&] { return progress->done.load() == count; });
}

Shape shape_of(const ffi::Buffer<ffi::F32>& u, const ffi::Buffer<ffi::F32>& A, int64_t chunk) {
  auto dims = u.dimensions();
  return Shape{dims[0], dims[1], dims[2], A.dimensions()[1], std::max<int64_t>(chunk, 1)};
}

ffi::Error forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> u, ffi::Buffer<ffi::F32> delta,
                   ffi::Buffer<ffi::F32> A, ffi::Buffer<ffi::F32> B, ffi::Buffer<ffi::F32> C,
                   ffi::Buffer<ffi::F32> h0, ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> h_last,
                   ffi::ResultBuffer<ffi::F32> h_starts, int64_t chunk) {
  ForwardArgs p{shape_of(u, A, chunk), u.typed_data(), delta.typed_data(), A.typed_data(), B.typed_data(),
                C.typed_data(), h0.typed_data(), y->typed_data(), h_last->typed_data(), h_starts->typed_data()};
  parallel_for(pool, p.s.batch * p.s.blocks(), [&](int64_t task) { forward_task(p, task); });
  return ffi::Error::Success();
}

ffi::Error backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> u, ffi::Buffer<ffi::F32> delta,
                    ffi::Buffer<ffi::F32> A, ffi::Buffer<ffi::F32> B, ffi::Buffer<ffi::F32> C,
                    ffi::Buffer<ffi::F32> h_starts, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> dh_last,
                    ffi::ResultBuffer<ffi::F32> du, ffi::ResultBuffer<ffi::F32> ddelta,
                    ffi::ResultBuffer<ffi::F32> dA_part, ffi::ResultBuffer<ffi::F32> dB_part,
                    ffi::ResultBuffer<ffi::F32> dC_part, ffi::ResultBuffer<ffi::F32> dh0, int64_t chunk) {
  BackwardArgs p{shape_of(u, A, chunk), dB_part->dimensions()[0], u.typed_data(), delta.typed_data(),
                 A.typed_data(), B.typed_data(), C.typed_data(), h_starts.typed_data(), dy.typed_data(),
                 dh_last.typed_data(), du->typed_data(), ddelta->typed_data(), dA_part->typed_data(),
                 dB_part->typed_data(), dC_part->typed_data(), dh0->typed_data()};
  parallel_for(pool, p.groups * p.s.batch, [&](int64_t task) { backward_task(p, task); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AlignmambaSelectiveScanForward, forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // u
                                  .Arg<ffi::Buffer<ffi::F32>>()  // delta
                                  .Arg<ffi::Buffer<ffi::F32>>()  // A
                                  .Arg<ffi::Buffer<ffi::F32>>()  // B
                                  .Arg<ffi::Buffer<ffi::F32>>()  // C
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // h_last
                                  .Ret<ffi::Buffer<ffi::F32>>()  // h_starts
                                  .Attr<int64_t>("chunk"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AlignmambaSelectiveScanBackward, backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // u
                                  .Arg<ffi::Buffer<ffi::F32>>()  // delta
                                  .Arg<ffi::Buffer<ffi::F32>>()  // A
                                  .Arg<ffi::Buffer<ffi::F32>>()  // B
                                  .Arg<ffi::Buffer<ffi::F32>>()  // C
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h_starts
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dh_last
                                  .Ret<ffi::Buffer<ffi::F32>>()  // du
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ddelta
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dA_part
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dB_part
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dC_part
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dh0
                                  .Attr<int64_t>("chunk"));
