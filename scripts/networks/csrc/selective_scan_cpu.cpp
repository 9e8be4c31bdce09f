// Fused selective scan for the CPU: the S6 recurrence of Mamba in a single pass over its inputs.
//
// The PyTorch backend (selective_scan.py) materialises the decays exp(dt * A) and the input terms of every step as
// (L, batch, dim, N) tensors and runs the recurrence one step per tensor operation, so its time goes into memory
// passes and per-operation overheads. Here each work item owns a block of channels and walks through time with its
// states (N x block floats) in L1: the softplus, the decays, the state update and the contraction with C all happen
// in registers, and the only memory traffic is reading the inputs and writing the outputs once.
//
// Three operators, registered as torch.ops.vmaml_unet.*:
//   selective_scan_forward: mamba-ssm's selective_scan_fn convention (batch, dim, L) with grouped B and C, and the
//     states entering every chunk for the backward pass.
//   selective_scan_backward: the gradients of all seven inputs from those checkpoints, recomputing each chunk's
//     states and running the adjoint recurrence backwards (the algorithm of the PyTorch backend's backward).
//   cross_selective_scan_forward: SS2D's four scans of a (batch, H, W, channels) map (row-major, column-major and the
//     reverse of each) read straight from the map in pixel order and summed back into it, which replaces SS2D's
//     cross-scan copies and cross-merge. Inference only (no states are kept).
//
// Compiled at first use by scripts/networks/selective_scan_cpu.py for the CPU it runs on (-march=native), with
// -fno-trapping-math: the branch-free approximations below vectorise only when the compiler may evaluate both sides
// of a select.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <tuple>
#include <vector>

namespace {

constexpr float kLog2E = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// Channels per work item: one vector of the widest kind the CPU has (measured on an AVX-512 CPU, 16 lanes ran the
// scan 1.6x faster than 8; compiled without AVX-512, 16 lanes ran 4x slower than 8).
#if defined(__AVX512F__)
constexpr int kBlock = 16;
#else
constexpr int kBlock = 8;
#endif
constexpr int kDirections = 4;
constexpr int64_t kMaxState = 64;
constexpr int64_t kMaxChunk = 4096;  // bounds the per-thread chunk buffers

// kBlock float32 lanes in GCC/Clang vector extensions: one AVX-512 or AVX2 register where the CPU has them, pairs of
// SSE or NEON registers elsewhere. Written out rather than left to auto-vectorisation, which may pick the state loop
// instead of the channel loop and then gathers every operand.
typedef float Vec __attribute__((vector_size(kBlock * sizeof(float))));
typedef int32_t IVec __attribute__((vector_size(kBlock * sizeof(int32_t))));

inline Vec splat(float x) {
  return Vec{} + x;
}

inline Vec as_float(IVec bits) {
  Vec value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline IVec as_int(Vec value) {
  IVec bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// Full blocks load and store whole vectors; the channels past the last full block are handled one at a time, in
// lane 0 of a vector whose other lanes are zero.
template <bool Full>
inline Vec load(const float* src) {
  Vec v{};
  std::memcpy(&v, src, (Full ? kBlock : 1) * sizeof(float));
  return v;
}

template <bool Full>
inline void store(float* dst, Vec v) {
  std::memcpy(dst, &v, (Full ? kBlock : 1) * sizeof(float));
}

// 2^x within 1.1e-7 relative for x >= -126 (below, 2^-126 times the fraction's power). Rounding to the nearest
// integer, not down, leaves a small |x| as the fraction unchanged: decays close to 1 carry the scan's long memory,
// and their errors must not be biased (a bias of 1e-8 per step compounds over thousands of steps).
inline Vec exp2_approx(Vec x) {
  x = x < -126.0f ? splat(-126.0f) : x;
  x = x > 126.0f ? splat(126.0f) : x;
  // Adding and subtracting 1.5 * 2^23 rounds |x| < 2^22 to the nearest integer.
  const Vec whole = (x + 12582912.0f) - 12582912.0f;
  const Vec f = x - whole;
  // least-squares fit of 2^f on [-0.5, 0.5] with the constant term fixed to 1
  Vec p = splat(1.5370711e-4f);
  p = p * f + 1.3399853e-3f;
  p = p * f + 9.6183736e-3f;
  p = p * f + 5.5503290e-2f;
  p = p * f + 2.4022648e-1f;
  p = p * f + 6.9314718e-1f;
  p = p * f + 1.0f;
  return p * as_float((__builtin_convertvector(whole, IVec) + 127) << 23);
}

// ln(x) for finite x >= 1: x = m 2^e with m in [sqrt(1/2), sqrt(2)), ln(m) = 2 atanh(s) with s = (m - 1) / (m + 1),
// |s| <= 0.172, summed to s^9 (truncation error below 1e-9).
inline Vec log_approx(Vec x) {
  const IVec bits = as_int(x);
  IVec exponent = ((bits >> 23) & 0xff) - 127;
  Vec m = as_float((bits & 0x007fffff) | 0x3f800000);
  const IVec high = m > 1.41421356f;  // lanes of -1 where true
  m = high ? m * 0.5f : m;
  exponent -= high;
  const Vec s = (m - 1.0f) / (m + 1.0f);
  const Vec s2 = s * s;
  Vec p = splat(1.0f / 9.0f);
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p + __builtin_convertvector(exponent, Vec) * kLn2;
}

// torch.nn.functional.softplus with its default threshold: x above 20, else log1p(exp(x)). log1p(e) is computed as
// ln(1 + e) * e / ((1 + e) - 1), which cancels the rounding of 1 + e: step sizes of 1e-3 (the initial range of SS2D)
// would otherwise lose four digits.
inline Vec softplus_approx(Vec x) {
  const Vec e = exp2_approx(x * kLog2E);
  const Vec one_plus = 1.0f + e;
  const Vec log1p = one_plus == 1.0f ? e : log_approx(one_plus) * e / (one_plus - 1.0f);
  return x > 20.0f ? x : log1p;
}

// A float32 operand with unit channel stride: element (batch b, group or direction k, channel c, position p) at
// data + b * batch + k * group + c + p * position.
struct Sequence {
  float* data;
  int64_t batch;
  int64_t group;
  int64_t position;
};

// B or C: element (b, k, state n, position p) at data + b * batch + k * group + n * state + p * position.
struct Projection {
  const float* data;
  int64_t batch;
  int64_t group;
  int64_t state;
  int64_t position;
};

struct ScanProblem {
  int64_t batch;
  int64_t groups;    // groups of B and C, or the four scan directions
  int64_t channels;  // channels per group
  int64_t d_state;
  int64_t length;
  int64_t height;  // of the map in cross mode (length = height * width)
  int64_t width;
  bool cross;       // group k scans the map in direction k; otherwise position = step
  bool accumulate;  // the groups share `out` (cross mode): a work item runs all of them and adds their outputs
  bool delta_softplus;
  int64_t chunk;  // steps per chunk: every work item of a thread advances one chunk before the next chunk starts
  Sequence u;
  Sequence delta;
  Sequence out;
  Projection b;
  Projection c;
  const float* a2;          // (N, groups * channels): A transposed, times log2(e)
  const float* skip;        // D, (groups * channels), or nullptr
  const float* delta_bias;  // (groups * channels), or nullptr
  float* checkpoints;       // (num_chunks, batch, groups, N, channels): the states entering each chunk, or nullptr
};

// Position read at step t by direction k of a height x width map: row-major, column-major, and the reverse of each.
inline int64_t cross_position(const ScanProblem& p, int64_t k, int64_t t) {
  switch (k) {
    case 0:
      return t;
    case 1:
      return (t % p.height) * p.width + t / p.height;
    case 2:
      return p.length - 1 - t;
    default:
      return p.length - 1 - ((t % p.height) * p.width + t / p.height);
  }
}

// Per-thread buffers for one chunk: the positions each group reads, and the step sizes, inputs dt * u and outputs of
// a block of channels.
struct ChunkScratch {
  explicit ChunkScratch(const ScanProblem& p)
      : positions(p.groups * p.chunk), dt(p.chunk), du(p.chunk), y(p.chunk) {}
  std::vector<int64_t> positions;  // (groups, chunk)
  std::vector<Vec> dt;
  std::vector<Vec> du;
  std::vector<Vec> y;
};

// Steps [t0, t1) of group k for the block of channels from c0 (kBlock of them if Full, else one), its states h
// (one vector per state) updated in place. The step sizes (softplus and all) of the whole chunk are computed before
// its recurrence, so that neither waits for the other's latency.
template <bool Full>
void scan_steps(
    const ScanProblem& p, int64_t b, int64_t k, int64_t c0, int64_t t0, int64_t t1, Vec* h, ChunkScratch& scratch) {
  const int64_t param = k * p.channels + c0;
  const int64_t all_channels = p.groups * p.channels;
  const int64_t steps = t1 - t0;
  const int64_t* positions = scratch.positions.data() + k * p.chunk;
  Vec* dt = scratch.dt.data();
  Vec* du = scratch.du.data();
  Vec* y = scratch.y.data();

  const Vec bias = p.delta_bias != nullptr ? load<Full>(p.delta_bias + param) : Vec{};
  const Vec skip = p.skip != nullptr ? load<Full>(p.skip + param) : Vec{};
  const float* u_base = p.u.data + b * p.u.batch + k * p.u.group + c0;
  const float* delta_base = p.delta.data + b * p.delta.batch + k * p.delta.group + c0;
  for (int64_t i = 0; i < steps; ++i) {
    const Vec u = load<Full>(u_base + positions[i] * p.u.position);
    const Vec x = load<Full>(delta_base + positions[i] * p.delta.position) + bias;
    dt[i] = p.delta_softplus ? softplus_approx(x) : x;
    du[i] = dt[i] * u;
    y[i] = skip * u;
  }

  Vec a2[kMaxState];
  for (int64_t n = 0; n < p.d_state; ++n) {
    a2[n] = load<Full>(p.a2 + n * all_channels + param);
  }
  const float* b_base = p.b.data + b * p.b.batch + k * p.b.group;
  const float* c_base = p.c.data + b * p.c.batch + k * p.c.group;
  for (int64_t i = 0; i < steps; ++i) {
    const float* b_t = b_base + positions[i] * p.b.position;
    const float* c_t = c_base + positions[i] * p.c.position;
    Vec y_t = y[i];
    for (int64_t n = 0; n < p.d_state; ++n) {
      h[n] = exp2_approx(dt[i] * a2[n]) * h[n] + du[i] * b_t[n * p.b.state];
      y_t += c_t[n * p.c.state] * h[n];
    }
    y[i] = y_t;
  }

  float* out_base = p.out.data + b * p.out.batch + k * p.out.group + c0;
  for (int64_t i = 0; i < steps; ++i) {
    float* out = out_base + positions[i] * p.out.position;
    store<Full>(out, p.accumulate ? load<Full>(out) + y[i] : y[i]);
  }
}

// The channels of a group in blocks: kBlock channels each, then, past the last full block, one channel each.
struct ChannelBlock {
  int64_t c0;
  int width;
};

inline int64_t num_channel_blocks(int64_t channels) {
  return channels / kBlock + channels % kBlock;
}

inline ChannelBlock channel_block(int64_t channels, int64_t q) {
  const int64_t full = channels / kBlock;
  return q < full ? ChannelBlock{q * kBlock, kBlock} : ChannelBlock{full * kBlock + (q - full), 1};
}

// A work item of the forward pass: batch element b, a group (or all four directions when accumulating) and a block
// of channels.
struct WorkItem {
  int64_t b;
  int64_t k;
  ChannelBlock block;
};

WorkItem work_item(const ScanProblem& p, int64_t index) {
  const int64_t per_group = num_channel_blocks(p.channels);
  const int64_t groups = p.accumulate ? 1 : p.groups;
  const int64_t k = (index / per_group) % groups;
  const int64_t b = index / (per_group * groups);
  return WorkItem{b, k, channel_block(p.channels, index % per_group)};
}

int64_t num_work_items(const ScanProblem& p) {
  return p.batch * (p.accumulate ? 1 : p.groups) * num_channel_blocks(p.channels);
}

// Items [first, last) over the whole sequence. states: (items, groups per item, N) vectors, zero on entry.
void run_items(const ScanProblem& p, int64_t first, int64_t last, Vec* states) {
  const int64_t groups_per_item = p.accumulate ? p.groups : 1;
  ChunkScratch scratch(p);
  for (int64_t t0 = 0; t0 < p.length; t0 += p.chunk) {
    const int64_t t1 = std::min(p.length, t0 + p.chunk);
    for (int64_t k = 0; k < p.groups; ++k) {
      for (int64_t t = t0; t < t1; ++t) {
        scratch.positions[k * p.chunk + t - t0] = p.cross ? cross_position(p, k, t) : t;
      }
    }
    for (int64_t index = first; index < last; ++index) {
      const WorkItem item = work_item(p, index);
      for (int64_t g = 0; g < groups_per_item; ++g) {
        const int64_t k = p.accumulate ? g : item.k;
        Vec* h = states + ((index - first) * groups_per_item + g) * p.d_state;
        if (p.checkpoints != nullptr) {
          float* saved = p.checkpoints +
              (((t0 / p.chunk) * p.batch + item.b) * p.groups + k) * p.d_state * p.channels + item.block.c0;
          for (int64_t n = 0; n < p.d_state; ++n) {
            std::memcpy(saved + n * p.channels, &h[n], item.block.width * sizeof(float));
          }
        }
        if (item.block.width == kBlock) {
          scan_steps<true>(p, item.b, k, item.block.c0, t0, t1, h, scratch);
        } else {
          scan_steps<false>(p, item.b, k, item.block.c0, t0, t1, h, scratch);
        }
      }
    }
  }
}

// Runs body(first, last) over contiguous ranges of [0, items), one range per thread of torch's intra-op thread count.
// Work items never share outputs, so the threads need no synchronisation. at::parallel_for runs them on torch's own
// thread pool: where torch uses OpenMP, selective_scan_cpu.py builds this file with -fopenmp for that (the function
// is inlined from OpenMP headers). Threads of our own would compete with that pool's workers, which keep spinning for
// milliseconds after every parallel torch operation: the four-direction scan ran 2x slower on 2 cores that way. An
// OpenMP torch whose pool cannot be reached (a compiler without OpenMP) gets std::thread.
template <typename Body>
void parallel_over(int64_t items, const Body& body) {
#if defined(_OPENMP) || AT_PARALLEL_NATIVE
  at::parallel_for(0, items, 1, body);
#else
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  auto range = [&](int64_t i) { return items * i / threads; };
  for (int64_t i = 1; i < threads; ++i) {
    pool.emplace_back([&body, &range, i] { body(range(i), range(i + 1)); });
  }
  body(0, range(1));
  for (auto& thread : pool) {
    thread.join();
  }
#endif
}

void run(const ScanProblem& p) {
  const int64_t items = num_work_items(p);
  if (items == 0 || p.length == 0) {
    return;
  }
  const int64_t per_item = (p.accumulate ? p.groups : 1) * p.d_state;
  std::vector<Vec> states(items * per_item, Vec{});
  parallel_over(items, [&](int64_t first, int64_t last) { run_items(p, first, last, states.data() + first * per_item); });
}

// The backward pass of selective_scan_forward. With the adjoint state g_t = dLoss/dh_t = C_t dy_t + exp(dt_{t+1} A)
// g_{t+1}, the decay gradient P_t = g_t h_{t-1} exp(dt_t A) gives dA = sum_t P_t dt_t and dL/d dt_t = sum_n P_t A +
// u_t <g_t, B_t>; the input term gives du_t = dt_t <g_t, B_t> + D dy_t and dB_t = sum_d g_t dt_t u_t, and the output
// dC_t = sum_d dy_t h_t. A work item is a batch element and a whole group, so that the sums over channels (dB, dC)
// stay within one thread. Per chunk, from the last: each block of channels recomputes its states from the chunk's
// checkpoint, then runs the adjoint recurrence backwards, carrying exp(dt A) g into the previous chunk.
struct BackwardProblem {
  ScanProblem scan;  // the forward's inputs and checkpoints; out is unused
  Sequence grad_y;
  Sequence grad_u;
  Sequence grad_delta;
  float* grad_b;  // (L, batch, groups, N)
  float* grad_c;  // (L, batch, groups, N)
  float* grad_a;     // (batch, groups * channels, N), summed over the batch by the caller
  float* grad_skip;  // (batch, groups * channels), likewise
  float* grad_bias;  // (batch, groups * channels), likewise
};

// Per-thread buffers of one chunk of one block: states h_{t-1} (chunk + 1 slots), decays, step sizes and their
// softplus inputs, dt * u, and the vector partial sums of dB and dC over the group's blocks.
struct BackwardScratch {
  BackwardScratch(int64_t chunk, int64_t d_state)
      : states((chunk + 1) * d_state), decays(chunk * d_state), x(chunk), dt(chunk), du(chunk), grad_b(chunk * d_state),
        grad_c(chunk * d_state) {}
  std::vector<Vec> states;
  std::vector<Vec> decays;
  std::vector<Vec> x;
  std::vector<Vec> dt;
  std::vector<Vec> du;
  std::vector<Vec> grad_b;
  std::vector<Vec> grad_c;
};

inline Vec sigmoid_approx(Vec x) {
  return 1.0f / (1.0f + exp2_approx(-x * kLog2E));
}

// Steps [t0, t1) of the block of channels from c0 of group k: recompute, then the adjoint pass. carry (N vectors):
// exp(dt A) g at step t1, replaced by the same at t0. grad_a (N vectors), grad_skip, grad_bias: accumulated.
template <bool Full>
void backward_steps(
    const BackwardProblem& q,
    int64_t b,
    int64_t k,
    int64_t c0,
    int64_t t0,
    int64_t t1,
    BackwardScratch& scratch,
    Vec* carry,
    Vec* grad_a,
    Vec& grad_skip,
    Vec& grad_bias) {
  const ScanProblem& p = q.scan;
  const int64_t n_states = p.d_state;
  const int64_t param = k * p.channels + c0;
  const int64_t all_channels = p.groups * p.channels;
  const int64_t steps = t1 - t0;
  const Vec bias = p.delta_bias != nullptr ? load<Full>(p.delta_bias + param) : Vec{};
  const Vec skip = p.skip != nullptr ? load<Full>(p.skip + param) : Vec{};
  Vec a2[kMaxState];
  for (int64_t n = 0; n < n_states; ++n) {
    a2[n] = load<Full>(p.a2 + n * all_channels + param);
  }
  const int64_t u_base = b * p.u.batch + k * p.u.group + c0;
  const int64_t delta_base = b * p.delta.batch + k * p.delta.group + c0;
  const float* b_base = p.b.data + b * p.b.batch + k * p.b.group;
  const float* c_base = p.c.data + b * p.c.batch + k * p.c.group;
  Vec* states = scratch.states.data();
  Vec* decays = scratch.decays.data();
  const float* saved = p.checkpoints + (((t0 / p.chunk) * p.batch + b) * p.groups + k) * n_states * p.channels + c0;
  for (int64_t n = 0; n < n_states; ++n) {
    states[n] = load<Full>(saved + n * p.channels);
  }
  for (int64_t i = 0; i < steps; ++i) {
    const int64_t t = t0 + i;
    const Vec u = load<Full>(p.u.data + u_base + t * p.u.position);
    scratch.x[i] = load<Full>(p.delta.data + delta_base + t * p.delta.position) + bias;
    scratch.dt[i] = p.delta_softplus ? softplus_approx(scratch.x[i]) : scratch.x[i];
    scratch.du[i] = scratch.dt[i] * u;
    const float* b_t = b_base + t * p.b.position;
    for (int64_t n = 0; n < n_states; ++n) {
      decays[i * n_states + n] = exp2_approx(scratch.dt[i] * a2[n]);
      states[(i + 1) * n_states + n] = decays[i * n_states + n] * states[i * n_states + n] + scratch.du[i] * b_t[n * p.b.state];
    }
  }

  Vec g[kMaxState] = {};
  for (int64_t i = steps - 1; i >= 0; --i) {
    const int64_t t = t0 + i;
    const Vec u = load<Full>(p.u.data + u_base + t * p.u.position);
    const Vec dy = load<Full>(q.grad_y.data + b * q.grad_y.batch + k * q.grad_y.group + c0 + t * q.grad_y.position);
    const float* b_t = b_base + t * p.b.position;
    const float* c_t = c_base + t * p.c.position;
    Vec g_dot_b{};
    Vec decay_grad{};
    for (int64_t n = 0; n < n_states; ++n) {
      const Vec later = i == steps - 1 ? carry[n] : decays[(i + 1) * n_states + n] * g[n];
      g[n] = later + c_t[n * p.c.state] * dy;
      scratch.grad_c[i * n_states + n] += dy * states[(i + 1) * n_states + n];
      scratch.grad_b[i * n_states + n] += g[n] * scratch.du[i];
      g_dot_b += g[n] * b_t[n * p.b.state];
      // P_t = g_t h_{t-1} exp(dt_t A); with a2 = A log2(e), d exp(dt A) / d dt = exp(dt A) a2 ln(2)
      const Vec decay_term = g[n] * states[i * n_states + n] * decays[i * n_states + n];
      grad_a[n] += decay_term * scratch.dt[i];
      decay_grad += decay_term * a2[n];
    }
    const Vec grad_dt = decay_grad * kLn2 + u * g_dot_b;
    const Vec x = scratch.x[i];
    const Vec grad_x = p.delta_softplus ? (x > 20.0f ? grad_dt : grad_dt * sigmoid_approx(x)) : grad_dt;
    store<Full>(q.grad_u.data + b * q.grad_u.batch + k * q.grad_u.group + c0 + t * q.grad_u.position,
                scratch.dt[i] * g_dot_b + skip * dy);
    store<Full>(q.grad_delta.data + b * q.grad_delta.batch + k * q.grad_delta.group + c0 + t * q.grad_delta.position,
                grad_x);
    grad_skip += dy * u;
    grad_bias += grad_x;
  }
  for (int64_t n = 0; n < n_states; ++n) {
    carry[n] = decays[n] * g[n];
  }
}

inline float lane_sum(Vec v) {
  float lanes[kBlock];
  std::memcpy(lanes, &v, sizeof(lanes));
  float total = 0.0f;
  for (int j = 0; j < kBlock; ++j) {
    total += lanes[j];
  }
  return total;
}

void run_backward_items(const BackwardProblem& q, int64_t first, int64_t last) {
  const ScanProblem& p = q.scan;
  const int64_t n_states = p.d_state;
  const int64_t all_channels = p.groups * p.channels;
  const int64_t blocks = num_channel_blocks(p.channels);
  BackwardScratch scratch(p.chunk, n_states);
  std::vector<Vec> carry(blocks * n_states);
  std::vector<Vec> grad_a(blocks * n_states);
  std::vector<Vec> grad_skip(blocks);
  std::vector<Vec> grad_bias(blocks);
  const int64_t num_chunks = (p.length + p.chunk - 1) / p.chunk;
  for (int64_t index = first; index < last; ++index) {
    const int64_t k = index % p.groups;
    const int64_t b = index / p.groups;
    std::fill(carry.begin(), carry.end(), Vec{});
    std::fill(grad_a.begin(), grad_a.end(), Vec{});
    std::fill(grad_skip.begin(), grad_skip.end(), Vec{});
    std::fill(grad_bias.begin(), grad_bias.end(), Vec{});
    for (int64_t chunk = num_chunks - 1; chunk >= 0; --chunk) {
      const int64_t t0 = chunk * p.chunk;
      const int64_t t1 = std::min(p.length, t0 + p.chunk);
      std::fill(scratch.grad_b.begin(), scratch.grad_b.end(), Vec{});
      std::fill(scratch.grad_c.begin(), scratch.grad_c.end(), Vec{});
      for (int64_t block = 0; block < blocks; ++block) {
        const ChannelBlock channels = channel_block(p.channels, block);
        Vec* block_carry = carry.data() + block * n_states;
        Vec* block_grad_a = grad_a.data() + block * n_states;
        if (channels.width == kBlock) {
          backward_steps<true>(
              q, b, k, channels.c0, t0, t1, scratch, block_carry, block_grad_a, grad_skip[block], grad_bias[block]);
        } else {
          backward_steps<false>(
              q, b, k, channels.c0, t0, t1, scratch, block_carry, block_grad_a, grad_skip[block], grad_bias[block]);
        }
      }
      for (int64_t i = 0; i < t1 - t0; ++i) {
        const int64_t row = (((t0 + i) * p.batch + b) * p.groups + k) * n_states;
        for (int64_t n = 0; n < n_states; ++n) {
          q.grad_b[row + n] = lane_sum(scratch.grad_b[i * n_states + n]);
          q.grad_c[row + n] = lane_sum(scratch.grad_c[i * n_states + n]);
        }
      }
    }
    // Items of other batch elements own the same channels: each writes its own slice, summed by the caller.
    for (int64_t block = 0; block < blocks; ++block) {
      const ChannelBlock channels = channel_block(p.channels, block);
      const int64_t channel = k * p.channels + channels.c0;
      float lanes[kBlock];
      for (int64_t n = 0; n < n_states; ++n) {
        std::memcpy(lanes, &grad_a[block * n_states + n], sizeof(lanes));
        for (int j = 0; j < channels.width; ++j) {
          q.grad_a[(b * all_channels + channel + j) * n_states + n] = lanes[j];
        }
      }
      std::memcpy(lanes, &grad_skip[block], sizeof(lanes));
      std::memcpy(q.grad_skip + b * all_channels + channel, lanes, channels.width * sizeof(float));
      std::memcpy(lanes, &grad_bias[block], sizeof(lanes));
      std::memcpy(q.grad_bias + b * all_channels + channel, lanes, channels.width * sizeof(float));
    }
  }
}

void check_float32_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "the CPU selective scan needs CPU tensors, got ", name, " on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "the CPU selective scan needs float32, got ", name, " as ", t.scalar_type());
}

void check_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  check_float32_cpu(u, "u");
  check_float32_cpu(delta, "delta");
  check_float32_cpu(a, "A");
  check_float32_cpu(b, "B");
  check_float32_cpu(c, "C");
}

// (batch, dim, L) with unit channel stride, so that a work item's channels load as one vector: (batch, dim, L)-
// contiguous inputs are transposed to time-major once.
at::Tensor time_major(const at::Tensor& t) {
  return t.stride(1) == 1 ? t : t.permute({2, 0, 1}).contiguous().permute({1, 2, 0});
}

at::Tensor log2e_a_transposed(const at::Tensor& a) {
  return (a.t() * kLog2E).contiguous();
}

const float* optional_data(const c10::optional<at::Tensor>& t, at::Tensor& holder, const char* name) {
  if (!t.has_value()) {
    return nullptr;
  }
  check_float32_cpu(*t, name);
  holder = t->contiguous();
  return holder.data_ptr<float>();
}

// The checked inputs of selective_scan_forward and _backward as a ScanProblem (without out and checkpoints), and
// the tensors its pointers point into. u, delta: (batch, dim, L); A: (dim, N); B, C: (batch, groups, N, L);
// D, delta_bias: (dim,) or None.
struct SequenceScan {
  ScanProblem p{};
  at::Tensor u;  // with unit channel stride
  at::Tensor delta;
  at::Tensor a2;
  at::Tensor skip;
  at::Tensor delta_bias;
};

SequenceScan sequence_scan(
    const at::Tensor& u,
    const at::Tensor& delta,
    const at::Tensor& a,
    const at::Tensor& b,
    const at::Tensor& c,
    const c10::optional<at::Tensor>& d,
    const c10::optional<at::Tensor>& delta_bias,
    bool delta_softplus,
    int64_t chunk) {
  check_inputs(u, delta, a, b, c);
  TORCH_CHECK(u.dim() == 3 && delta.sizes() == u.sizes(), "u and delta must be (batch, dim, L) of one shape");
  TORCH_CHECK(b.dim() == 4 && c.sizes() == b.sizes(), "B and C must be (batch, groups, N, L) of one shape");
  TORCH_CHECK(chunk > 0 && chunk <= kMaxChunk, "chunk must be in [1, ", kMaxChunk, "], got ", chunk);
  const int64_t dim = u.size(1), groups = b.size(1), d_state = b.size(2);
  TORCH_CHECK(groups > 0 && dim % groups == 0, "the groups of B and C must divide dim");
  TORCH_CHECK(a.dim() == 2 && a.size(0) == dim && a.size(1) == d_state, "A must be (dim, N)");
  TORCH_CHECK(d_state <= kMaxState, "the CPU selective scan supports N <= ", kMaxState, ", got ", d_state);
  SequenceScan scan;
  scan.u = time_major(u);
  scan.delta = time_major(delta);
  scan.a2 = log2e_a_transposed(a);
  ScanProblem& p = scan.p;
  p.batch = u.size(0);
  p.groups = groups;
  p.channels = dim / groups;
  p.d_state = d_state;
  p.length = u.size(2);
  p.height = 1;
  p.width = p.length;
  p.cross = false;
  p.accumulate = false;
  p.delta_softplus = delta_softplus;
  p.chunk = chunk;
  p.u = {scan.u.data_ptr<float>(), scan.u.stride(0), p.channels, scan.u.stride(2)};
  p.delta = {scan.delta.data_ptr<float>(), scan.delta.stride(0), p.channels, scan.delta.stride(2)};
  p.b = {b.data_ptr<float>(), b.stride(0), b.stride(1), b.stride(2), b.stride(3)};
  p.c = {c.data_ptr<float>(), c.stride(0), c.stride(1), c.stride(2), c.stride(3)};
  p.a2 = scan.a2.data_ptr<float>();
  p.skip = optional_data(d, scan.skip, "D");
  p.delta_bias = optional_data(delta_bias, scan.delta_bias, "delta_bias");
  return scan;
}

// Returns the output (batch, dim, L), time-major in memory, and the states entering every chunk of `chunk` steps,
// (num_chunks, batch, groups, N, dim / groups), or an empty tensor without save_checkpoints.
std::tuple<at::Tensor, at::Tensor> selective_scan_forward(
    const at::Tensor& u,
    const at::Tensor& delta,
    const at::Tensor& a,
    const at::Tensor& b,
    const at::Tensor& c,
    const c10::optional<at::Tensor>& d,
    const c10::optional<at::Tensor>& delta_bias,
    bool delta_softplus,
    int64_t chunk,
    bool save_checkpoints) {
  SequenceScan scan = sequence_scan(u, delta, a, b, c, d, delta_bias, delta_softplus, chunk);
  ScanProblem& p = scan.p;
  at::Tensor out = at::empty({p.length, p.batch, p.groups * p.channels}, u.options()).permute({1, 2, 0});
  const int64_t num_chunks = (p.length + chunk - 1) / chunk;
  at::Tensor checkpoints = at::empty(
      {save_checkpoints ? num_chunks : 0, p.batch, p.groups, p.d_state, p.channels}, u.options());
  p.out = {out.data_ptr<float>(), out.stride(0), p.channels, out.stride(2)};
  p.checkpoints = save_checkpoints ? checkpoints.data_ptr<float>() : nullptr;
  run(p);
  return {out, checkpoints};
}

// Gradients of selective_scan_forward from its inputs, its checkpoints (saved with the same chunk) and grad_y
// (batch, dim, L): [du, ddelta, dA, dB, dC, dD, ddelta_bias] in the shapes of the inputs (du, ddelta, dB and dC
// time-major in memory); dD and ddelta_bias are empty tensors when D or delta_bias is None.
std::vector<at::Tensor> selective_scan_backward(
    const at::Tensor& u,
    const at::Tensor& delta,
    const at::Tensor& a,
    const at::Tensor& b,
    const at::Tensor& c,
    const c10::optional<at::Tensor>& d,
    const c10::optional<at::Tensor>& delta_bias,
    bool delta_softplus,
    int64_t chunk,
    const at::Tensor& checkpoints,
    const at::Tensor& grad_y) {
  SequenceScan scan = sequence_scan(u, delta, a, b, c, d, delta_bias, delta_softplus, chunk);
  const ScanProblem& p = scan.p;
  check_float32_cpu(checkpoints, "checkpoints");
  check_float32_cpu(grad_y, "grad_y");
  TORCH_CHECK(grad_y.sizes() == u.sizes(), "grad_y must have the shape of u");
  const int64_t batch = p.batch, dim = p.groups * p.channels, length = p.length;
  const int64_t num_chunks = (length + chunk - 1) / chunk;
  TORCH_CHECK(checkpoints.is_contiguous() &&
                  checkpoints.sizes() == at::IntArrayRef({num_chunks, batch, p.groups, p.d_state, p.channels}),
              "checkpoints must be the forward's, saved with the same chunk");
  const at::Tensor grad_y_t = time_major(grad_y);
  const auto options = u.options();
  at::Tensor grad_u = at::empty({length, batch, dim}, options).permute({1, 2, 0});
  at::Tensor grad_delta = at::empty({length, batch, dim}, options).permute({1, 2, 0});
  at::Tensor grad_b = at::empty({length, batch, p.groups, p.d_state}, options);
  at::Tensor grad_c = at::empty({length, batch, p.groups, p.d_state}, options);
  at::Tensor grad_a = at::zeros({batch, dim, p.d_state}, options);
  at::Tensor grad_skip = at::zeros({batch, dim}, options);
  at::Tensor grad_bias = at::zeros({batch, dim}, options);
  BackwardProblem q{};
  q.scan = p;
  q.scan.checkpoints = const_cast<float*>(checkpoints.data_ptr<float>());
  q.grad_y = {grad_y_t.data_ptr<float>(), grad_y_t.stride(0), p.channels, grad_y_t.stride(2)};
  q.grad_u = {grad_u.data_ptr<float>(), grad_u.stride(0), p.channels, grad_u.stride(2)};
  q.grad_delta = {grad_delta.data_ptr<float>(), grad_delta.stride(0), p.channels, grad_delta.stride(2)};
  q.grad_b = grad_b.data_ptr<float>();
  q.grad_c = grad_c.data_ptr<float>();
  q.grad_a = grad_a.data_ptr<float>();
  q.grad_skip = grad_skip.data_ptr<float>();
  q.grad_bias = grad_bias.data_ptr<float>();
  if (length > 0) {
    parallel_over(batch * p.groups, [&](int64_t first, int64_t last) { run_backward_items(q, first, last); });
  }
  return {
      grad_u,
      grad_delta,
      grad_a.sum(0),
      grad_b.permute({1, 2, 3, 0}),
      grad_c.permute({1, 2, 3, 0}),
      d.has_value() ? grad_skip.sum(0) : at::empty({0}, options),
      delta_bias.has_value() ? grad_bias.sum(0) : at::empty({0}, options)};
}

// SS2D's four scans of a map. u: (batch, H, W, channels); delta: (batch, H, W, 4, channels); B, C: (batch, H, W, 4,
// N); A: (4 * channels, N); D, delta_bias: (4 * channels,) or None. Direction k reads its own channels
// k * channels + c of delta, A, D and delta_bias. Returns (batch, H, W, channels): the four outputs summed at their
// pixels, as SS2D's cross-merge does.
at::Tensor cross_selective_scan_forward(
    const at::Tensor& u,
    const at::Tensor& delta,
    const at::Tensor& a,
    const at::Tensor& b,
    const at::Tensor& c,
    const c10::optional<at::Tensor>& d,
    const c10::optional<at::Tensor>& delta_bias,
    bool delta_softplus,
    int64_t chunk) {
  check_inputs(u, delta, a, b, c);
  TORCH_CHECK(u.dim() == 4, "u must be (batch, H, W, channels)");
  const int64_t batch = u.size(0), height = u.size(1), width = u.size(2), channels = u.size(3);
  TORCH_CHECK(
      delta.dim() == 5 && delta.size(0) == batch && delta.size(1) == height && delta.size(2) == width &&
          delta.size(3) == kDirections && delta.size(4) == channels,
      "delta must be (batch, H, W, 4, channels)");
  TORCH_CHECK(
      b.dim() == 5 && c.sizes() == b.sizes() && b.size(0) == batch && b.size(1) == height && b.size(2) == width &&
          b.size(3) == kDirections,
      "B and C must be (batch, H, W, 4, N) of one shape");
  const int64_t d_state = b.size(4);
  TORCH_CHECK(a.dim() == 2 && a.size(0) == kDirections * channels && a.size(1) == d_state, "A must be (4 * channels, N)");
  TORCH_CHECK(d_state <= kMaxState, "the CPU selective scan supports N <= ", kMaxState, ", got ", d_state);
  TORCH_CHECK(chunk > 0 && chunk <= kMaxChunk, "chunk must be in [1, ", kMaxChunk, "], got ", chunk);
  // Pixels must be addressable as one linear index: contiguous over (H, W) up to the channel stride.
  const at::Tensor u_c = u.contiguous(), delta_c = delta.contiguous();
  const at::Tensor b_c = b.stride(1) == b.stride(2) * width ? b : b.contiguous();
  const at::Tensor c_c = c.stride(1) == c.stride(2) * width ? c : c.contiguous();
  at::Tensor out = at::zeros({batch, height, width, channels}, u.options());
  const at::Tensor a2 = log2e_a_transposed(a);
  at::Tensor d_holder, bias_holder;
  ScanProblem p{};
  p.batch = batch;
  p.groups = kDirections;
  p.channels = channels;
  p.d_state = d_state;
  p.length = height * width;
  p.height = height;
  p.width = width;
  p.cross = true;
  p.accumulate = true;
  p.delta_softplus = delta_softplus;
  p.chunk = chunk;
  p.u = {u_c.data_ptr<float>(), u_c.stride(0), 0, u_c.stride(2)};
  p.delta = {delta_c.data_ptr<float>(), delta_c.stride(0), delta_c.stride(3), delta_c.stride(2)};
  p.out = {out.data_ptr<float>(), out.stride(0), 0, out.stride(2)};
  p.b = {b_c.data_ptr<float>(), b_c.stride(0), b_c.stride(3), b_c.stride(4), b_c.stride(2)};
  p.c = {c_c.data_ptr<float>(), c_c.stride(0), c_c.stride(3), c_c.stride(4), c_c.stride(2)};
  p.a2 = a2.data_ptr<float>();
  p.skip = optional_data(d, d_holder, "D");
  p.delta_bias = optional_data(delta_bias, bias_holder, "delta_bias");
  p.checkpoints = nullptr;
  run(p);
  return out;
}

}  // namespace

TORCH_LIBRARY(vmaml_unet, m) {
  m.def(
      "selective_scan_forward(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? delta_bias, "
      "bool delta_softplus, int chunk, bool save_checkpoints) -> (Tensor, Tensor)",
      &selective_scan_forward);
  m.def(
      "selective_scan_backward(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? delta_bias, "
      "bool delta_softplus, int chunk, Tensor checkpoints, Tensor grad_y) -> Tensor[]",
      &selective_scan_backward);
  m.def(
      "cross_selective_scan_forward(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
      "Tensor? delta_bias, bool delta_softplus, int chunk) -> Tensor",
      &cross_selective_scan_forward);
}
