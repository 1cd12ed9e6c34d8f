// A measurement probe, not part of the kit: the one-row int4 product as a
// hand-written AVX-512 kernel (XLA FFI custom call), to compare with the loop
// XLA:CPU emits for pali_kit.quant's CPU decode (bench/quantize.py --forms).
//
// y[o] = sum_g s[o, g] * sum_{j in g} (xe[j] * lo(v[o, j]) + xo[j] * hi(v[o, j]))
//   v  int8[O, B]: two's complement nibbles, low = even input, high = odd input
//   s  float32[O, B / 32]: one scale per 64 inputs (32 bytes)
//   xe, xo bfloat16[B]: the even and odd inputs, rounded to bfloat16 (the numerics
//   policy for a bfloat16 weight: products of bfloat16 values, float32 sums).
// Per 32 bytes (64 weights): one zero-extension to 16-bit lanes, two 32-entry
// table lookups (vpermw) giving the levels as bfloat16, two vdpbf16ps (32
// products each, float32 sums), one multiply-add by the group's scale.
// Rows are split in chunks between the caller and XLA's intra-op thread pool.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

static void rows(const uint16_t* xe, const uint16_t* xo, const int8_t* v, const float* s,
                 float* y, int64_t r0, int64_t r1, int64_t B) {
  const int64_t G = B / 32;
  const __m512 levels = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
  const __m256bh half = _mm512_cvtneps_pbh(levels);  // exact: small integers
  const __m512i table = _mm512_inserti64x4(_mm512_castsi256_si512((__m256i)half), (__m256i)half, 1);
  const __m512i nibble = _mm512_set1_epi16(15);
  for (int64_t o = r0; o < r1; ++o) {
    const int8_t* row = v + o * B;
    const float* so = s + o * G;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(row + 32 * g)));
      __m512i lo = _mm512_permutexvar_epi16(_mm512_and_si512(w, nibble), table);
      __m512i hi = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), table);
      __m512 p = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)lo,
                                  (__m512bh)_mm512_loadu_si512(xe + 32 * g));
      p = _mm512_dpbf16_ps(p, (__m512bh)hi, (__m512bh)_mm512_loadu_si512(xo + 32 * g));
      acc = _mm512_fmadd_ps(p, _mm512_set1_ps(so[g]), acc);
    }
    y[o] = _mm512_reduce_add_ps(acc);
  }
}

// The caller and up to threads - 1 pool tasks take chunks of rows from one counter:
// the caller never waits for a task that has not started.
static void split(ffi::ThreadPool& pool, std::function<void(int64_t, int64_t)> f, int64_t O,
                  int64_t threads) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::function<void(int64_t, int64_t)> f;
    int64_t O, n, chunk = 256;
  };
  auto st = std::make_shared<State>();
  st->f = std::move(f);
  st->O = O;
  st->n = (O + st->chunk - 1) / st->chunk;
  auto work = [](State* s) {
    for (int64_t c; (c = s->next.fetch_add(1)) < s->n;) {
      s->f(c * s->chunk, std::min(s->O, (c + 1) * s->chunk));
      s->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([st, work] { work(st.get()); });
  work(st.get());
  while (st->done.load(std::memory_order_acquire) < st->n) _mm_pause();
}

static ffi::Error Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> xe, ffi::Buffer<ffi::BF16> xo,
                       ffi::Buffer<ffi::S8> v, ffi::Buffer<ffi::F32> s,
                       ffi::ResultBuffer<ffi::F32> y, int64_t threads) {
  const int64_t O = v.dimensions()[0], B = v.dimensions()[1];
  auto* pe = reinterpret_cast<const uint16_t*>(xe.typed_data());
  auto* po = reinterpret_cast<const uint16_t*>(xo.typed_data());
  const int8_t* pv = v.typed_data();
  const float* ps = s.typed_data();
  float* py = y->typed_data();
  split(pool, [=](int64_t a, int64_t b) { rows(pe, po, pv, ps, py, a, b, B); }, O, threads);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(Int4RowProduct, Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads"));
