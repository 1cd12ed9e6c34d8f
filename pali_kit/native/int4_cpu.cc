// pali_kit's int4 one-row product on x86-64 CPUs with AVX-512 BF16, as an XLA FFI handler.
// Compiled on first use by pali_kit.native (the system C++ compiler, jaxlib's FFI headers).
//
// y[o] = sum_g s[o, g0 + g] * sum_{j < 32} (xe[32 (g0 + g) + j] * lo(v[o, 32 g + j])
//                                         + xo[32 (g0 + g) + j] * hi(v[o, 32 g + j]))
//   xe, xo  bfloat16[N]: a row's even and odd inputs (N bytes per row, all blocks)
//   v       int8[O, B]: one column block of the packed levels, B a multiple of 32;
//           two's complement nibbles, low = even input, high = odd input
//   s       float32[O, N / 32]: one scale per 64 inputs (32 bytes), all blocks
//   start   the block's first byte within the row (a multiple of 32): g0 = start / 32
//   y       float32[O]
// Products of bfloat16 inputs and levels (-8..7, exact in bfloat16) are exact in float32;
// vdpbf16ps adds them in pairs into float32 sums (one sum per lane, 16 lanes per group);
// each group's sum is multiplied by its scale and added in float32.
// Rows are split in chunks between the calling thread and XLA's intra-op thread pool: one row
// on one core is bound by its vector instructions (~16 GB/s of packed bytes on a Zen 4 core),
// two cores reach about the memory's rate.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;


namespace {

struct Product {
  const uint16_t* xe;
  const uint16_t* xo;
  const int8_t* v;
  const float* s;
  float* y;
  int64_t bytes;   // B: bytes per row of this block
  int64_t groups;  // scales per row (all blocks)
  int64_t g0;      // the block's first group
};

inline __m512i levels_table() {
  const __m512 levels = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
  const __m256i half = (__m256i)_mm512_cvtneps_pbh(levels);  // exact: small integers
  return _mm512_inserti64x4(_mm512_castsi256_si512(half), half, 1);
}

// One row: per 32 bytes (one group) the levels of the low and the high nibbles as bfloat16,
// two vdpbf16ps (32 products each, pairs summed into 16 float32 lanes), one multiply-add by
// the group's scale. vpermw reads an index's low 5 bits and the table holds the 16 levels
// twice, so the low nibble needs no mask. (Four rows at a time, sharing the input loads,
// measured slower.)
inline void row(const Product& p, int64_t o) {
  const __m512i table = levels_table();
  const int8_t* v = p.v + o * p.bytes;
  const float* s = p.s + o * p.groups + p.g0;
  const uint16_t* xe = p.xe + 32 * p.g0;
  const uint16_t* xo = p.xo + 32 * p.g0;
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.bytes / 32; ++g) {
    const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(v + 32 * g)));
    const __m512i lo = _mm512_permutexvar_epi16(w, table);
    const __m512i hi = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), table);
    __m512 sum = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)lo,
                                  (__m512bh)_mm512_loadu_si512(xe + 32 * g));
    sum = _mm512_dpbf16_ps(sum, (__m512bh)hi, (__m512bh)_mm512_loadu_si512(xo + 32 * g));
    acc = _mm512_fmadd_ps(sum, _mm512_set1_ps(s[g]), acc);
  }
  p.y[o] = _mm512_reduce_add_ps(acc);
}

void row_range(const Product& p, int64_t a, int64_t b) {
  for (int64_t o = a; o < b; ++o) row(p, o);
}

// The rows are cut in chunks of ~64 KB, and the chunks in one contiguous segment per thread
// (the caller and threads - 1 tasks of XLA's intra-op pool), so that each thread streams
// through memory in order. A thread takes chunks from the front of its own segment, then
// from the back of the others' (a task that starts late, or runs slower, loses its chunks
// to the others): every chunk is computed once and the caller returns when all are done,
// never waiting for a task that has not started.
constexpr int64_t kChunkBytes = 65536;
constexpr int kMaxThreads = 64;

struct Split {
  Product p;
  int64_t rows, chunk, threads;
  // per segment: (front << 32) | back, chunk indices; the segment is empty when front >= back
  std::atomic<uint64_t> segment[kMaxThreads];
  std::atomic<int64_t> done{0};
  int64_t total;

  bool take(int t, bool front, int64_t* c) {
    uint64_t cur = segment[t].load(std::memory_order_relaxed);
    for (;;) {
      const int64_t f = static_cast<int64_t>(cur >> 32), b = static_cast<int64_t>(cur & 0xffffffffu);
      if (f >= b) return false;
      const uint64_t next = front ? cur + (uint64_t{1} << 32) : cur - 1;
      if (segment[t].compare_exchange_weak(cur, next, std::memory_order_relaxed)) {
        *c = front ? f : b - 1;
        return true;
      }
    }
  }
  void run(int64_t c) {
    row_range(p, c * chunk, std::min(rows, (c + 1) * chunk));
    done.fetch_add(1, std::memory_order_release);
  }
  void work(int t) {
    int64_t c;
    while (take(t, true, &c)) run(c);
    for (int64_t k = 1; k < threads; ++k) {
      const int u = static_cast<int>((t + k) % threads);
      while (take(u, false, &c)) run(c);
    }
  }
};

ffi::Error Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> xe, ffi::Buffer<ffi::BF16> xo,
                ffi::Buffer<ffi::S8> v, ffi::Buffer<ffi::F32> s, ffi::ResultBuffer<ffi::F32> y,
                int64_t start) {
  if (v.dimensions().size() != 2 || s.dimensions().size() != 2 ||
      xe.element_count() != xo.element_count())
    return ffi::Error::InvalidArgument("pk_int4_row_product: bad operand ranks");
  const int64_t rows = v.dimensions()[0], bytes = v.dimensions()[1];
  const int64_t groups = s.dimensions()[1];
  if (bytes % 32 || start % 32 || start < 0 || s.dimensions()[0] != rows ||
      (start + bytes) / 32 > groups || static_cast<int64_t>(xe.element_count()) < 32 * groups ||
      static_cast<int64_t>(y->element_count()) != rows)
    return ffi::Error::InvalidArgument("pk_int4_row_product: inconsistent shapes");
  auto st = std::make_shared<Split>();
  st->p = Product{reinterpret_cast<const uint16_t*>(xe.typed_data()),
                  reinterpret_cast<const uint16_t*>(xo.typed_data()),
                  v.typed_data(),
                  s.typed_data(),
                  y->typed_data(),
                  bytes,
                  groups,
                  start / 32};
  st->rows = rows;
  st->chunk = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(bytes, 1));
  st->total = (rows + st->chunk - 1) / st->chunk;
  if (st->total >= (int64_t{1} << 31))
    return ffi::Error::InvalidArgument("pk_int4_row_product: too many rows");
  st->threads = std::max<int64_t>(1, std::min<int64_t>({pool.num_threads(), st->total,
                                                        kMaxThreads}));
  for (int64_t t = 0; t < st->threads; ++t) {
    const uint64_t f = t * st->total / st->threads, b = (t + 1) * st->total / st->threads;
    st->segment[t].store((f << 32) | b, std::memory_order_relaxed);
  }
  for (int64_t t = 1; t < st->threads; ++t) pool.Schedule([st, t] { st->work(static_cast<int>(t)); });
  st->work(0);
  while (st->done.load(std::memory_order_acquire) < st->total) _mm_pause();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PkInt4RowProduct, Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("start"));
