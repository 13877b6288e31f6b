// XLA FFI custom call "fkv_cpu_attention": the selection attention of fkv_jax on x86 CPUs (see
// cpu_attention.h for the kernel, fkv_jax/kernels/cpu_ffi.py for the Python side that registers it).
//
// Work is split into tasks of (batch, query-frame group, head, query tile) taken from one atomic counter by
// the calling thread and by helpers scheduled on XLA:CPU's intra-op thread pool (ffi::ThreadPool). The
// caller never waits for a helper to start (a helper that starts late finds no task left and only drops its
// reference to the shared state), so the call cannot deadlock on a busy or single-threaded pool.

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "cpu_attention.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Shared {
  fkv::Problem p;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

std::string dims_str(ffi::AnyBuffer::Dimensions d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> kc,
                     ffi::Buffer<ffi::F32> vc, ffi::Buffer<ffi::F32> kn, ffi::Buffer<ffi::F32> vn,
                     ffi::Buffer<ffi::S32> frames, ffi::Buffer<ffi::PRED> cmask, ffi::Buffer<ffi::F32> mk,
                     ffi::Buffer<ffi::F32> mv, ffi::Buffer<ffi::PRED> mvalid, ffi::Buffer<ffi::S32> layer,
                     ffi::ResultBuffer<ffi::F32> out,
                     int64_t q_tile, int64_t k_tile, int64_t threads) {
  const auto qd = q.dimensions(), nd = kn.dimensions(), fd = frames.dimensions(), cd = cmask.dimensions(),
             md = mk.dimensions(), vd = mvalid.dimensions();
  if (qd.size() != 4 || (nd.size() != 5 && nd.size() != 6) || fd.size() != 4 || cd.size() != 4 ||
      md.size() != 4 || vd.size() != 3 || layer.element_count() != 1 || vn.dimensions().size() != nd.size())
    return ffi::Error::InvalidArgument("fkv_cpu_attention: wrong ranks");
  // the cache is one layer's [B, H, N, T, D], or the layer-stacked [L, B, H, N, T, D] read at layer[0]
  const size_t c0 = nd.size() - 5;
  const int64_t num_layers = c0 ? nd[0] : 1;
  fkv::Problem p{};
  p.B = qd[0], p.Sq = qd[1], p.H = qd[2], p.D = qd[3];
  p.N = nd[c0 + 2], p.T = nd[c0 + 3];
  p.Qf = fd[1], p.K = fd[3];
  p.C = cd[3];
  p.M = md[1];
  bool same_v = true;
  for (size_t i = 0; i < nd.size(); ++i) same_v = same_v && vn.dimensions()[i] == nd[i];
  const bool ok = same_v && nd[c0] == p.B && nd[c0 + 1] == p.H && nd[c0 + 4] == p.D && fd[0] == p.B &&
                  fd[2] == p.H && cd[0] == p.B && cd[1] == p.Qf && cd[2] == p.H && md[0] == p.B && md[2] == p.H && md[3] == p.D && vd[0] == p.B &&
                  vd[1] == p.H && vd[2] == p.M && p.Qf > 0 && p.Sq % p.Qf == 0 && p.C > 0 && p.Sq % p.C == 0 &&
                  p.D % 8 == 0 && q_tile > 0 && q_tile % 16 == 0 && k_tile > 0;
  if (!ok)
    return ffi::Error::InvalidArgument(
        "fkv_cpu_attention: inconsistent shapes q " + dims_str(qd) + ", cache " + dims_str(nd) + ", frames " +
        dims_str(fd) + ", chunk_mask " + dims_str(cd) + ", mem " + dims_str(md) + ", mem_valid " + dims_str(vd) +
        ", q_tile " + std::to_string(q_tile) + " (need head_dim % 8 == 0, q_tile % 16 == 0)");
  p.q = q.typed_data(), p.kc = kc.typed_data(), p.vc = vc.typed_data();
  const int64_t li = std::min<int64_t>(std::max<int64_t>(layer.typed_data()[0], 0), num_layers - 1);
  const int64_t layer_size = p.B * p.H * p.N * p.T * p.D;
  p.kn = kn.typed_data() + li * layer_size, p.vn = vn.typed_data() + li * layer_size;
  p.frames = frames.typed_data(), p.cmask = cmask.typed_data();
  p.mk = mk.typed_data(), p.mv = mv.typed_data(), p.mvalid = mvalid.typed_data();
  p.out = out->typed_data();
  p.tq = p.Sq / p.Qf;
  if (p.tq == 0 || p.B == 0 || p.H == 0) return ffi::Error::Success();  // nothing to compute
  int64_t workers = threads > 0 ? threads : std::max<int64_t>(1, pool.num_threads());
  // q_tile is the largest tile: the group's queries are split into equal tiles of at most that size. When
  // there are few (batch, group, head) units for the workers, the queries are split further (tiles of at
  // least 96 rows), so that per-head key lists of different lengths (Focused Forcing's budgets) still
  // spread evenly over the workers.
  int64_t ntiles = (p.tq + q_tile - 1) / q_tile;
  const int64_t units = p.B * p.Qf * p.H;
  while (units * ntiles < 4 * workers && (p.tq + ntiles) / (ntiles + 1) >= 96) ++ntiles;
  p.bq = std::min<int64_t>(q_tile, ((p.tq + ntiles - 1) / ntiles + 15) / 16 * 16);
  p.bk = k_tile;
  p.nqt = (p.tq + p.bq - 1) / p.bq;
  p.tasks = p.B * p.Qf * p.H * p.nqt;
  if (p.tasks == 0) return ffi::Error::Success();

  auto shared = std::make_shared<Shared>();
  shared->p = p;
  workers = std::min(workers, p.tasks);
  for (int64_t w = 1; w < workers; ++w)
    pool.Schedule([shared]() { fkv::run_range(shared->p, shared->next, shared->done); });
  fkv::run_range(shared->p, shared->next, shared->done);
  for (int64_t d = shared->done.load(std::memory_order_acquire); d < p.tasks;
       d = shared->done.load(std::memory_order_acquire))
    shared->done.wait(d, std::memory_order_acquire);
  return ffi::Error::Success();
}

}  // namespace

// exported (the library is compiled with -fvisibility=hidden)
extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* FkvCpuAttention(XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(FkvCpuAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k_chunk
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v_chunk
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k_cache
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v_cache
                                  .Arg<ffi::Buffer<ffi::S32>>()   // frames
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // chunk_mask
                                  .Arg<ffi::Buffer<ffi::F32>>()   // mem_k
                                  .Arg<ffi::Buffer<ffi::F32>>()   // mem_v
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mem_valid
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layer [1] (stacked cache)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Attr<int64_t>("q_tile")
                                  .Attr<int64_t>("k_tile")
                                  .Attr<int64_t>("threads"));

// 1 when this CPU has every instruction set the library was compiled for (checked before registering).
extern "C" __attribute__((visibility("default"))) int fkv_cpu_attention_supported() {
  __builtin_cpu_init();
  int ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#ifdef __AVX512F__
  ok = ok && __builtin_cpu_supports("avx512f");
#endif
#ifdef __AVX512VL__
  ok = ok && __builtin_cpu_supports("avx512vl");
#endif
#ifdef __AVX512BW__
  ok = ok && __builtin_cpu_supports("avx512bw");
#endif
#ifdef __AVX512DQ__
  ok = ok && __builtin_cpu_supports("avx512dq");
#endif
  return ok;
}

// What the library was compiled for (reported by the Python side).
extern "C" __attribute__((visibility("default"))) const char* fkv_cpu_attention_isa() {
#ifdef __AVX512VL__
  return "avx512vl";
#else
  return "avx2+fma";
#endif
}

// An (empty) Python extension module, so that the library setuptools builds is also a valid module; the
// kernel is reached through ctypes and jax.ffi, not through Python.
#include <Python.h>

static struct PyModuleDef fkv_cpu_attention_module = {PyModuleDef_HEAD_INIT, "_cpu_attention",
                                                      "fkv_jax's CPU attention kernel (loaded via ctypes).", -1,
                                                      nullptr};

PyMODINIT_FUNC PyInit__cpu_attention(void) { return PyModule_Create(&fkv_cpu_attention_module); }
