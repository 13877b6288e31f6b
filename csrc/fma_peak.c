// The float32 FMA peak of this CPU, for rooflines (BENCHMARKS.md "Where the remaining time goes"): 12
// independent AVX2 FMA accumulators per thread, kept in registers, on 1 and on 2 threads. Not part of the
// kernel library:
//   cc -O2 -mavx2 -mfma -pthread csrc/fma_peak.c -o "$TMPDIR/fma_peak" && "$TMPDIR/fma_peak" [threads]
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define ITERS 400000000L
#define ACC 12

static void* run(void* out) {
  __m256 a[ACC];
  const __m256 b = _mm256_set1_ps(1.0000001f), c = _mm256_set1_ps(1e-7f);
  for (int i = 0; i < ACC; ++i) a[i] = _mm256_set1_ps((float)i);
  for (long n = 0; n < ITERS; ++n) {
#pragma GCC unroll 12
    for (int i = 0; i < ACC; ++i) a[i] = _mm256_fmadd_ps(a[i], b, c);
  }
  float s = 0;
  for (int i = 0; i < ACC; ++i) s += a[i][0];
  *(float*)out = s;  // keeps the loop alive
  return NULL;
}

int main(int argc, char** argv) {
  const int max_threads = argc > 1 ? atoi(argv[1]) : 2;
  if (max_threads < 1 || max_threads > 256) {
    fprintf(stderr, "error: threads must be 1..256, got %s\n", argv[1]);
    return 2;
  }
  pthread_t th[256];
  float sink[256];
  for (int nt = 1; nt <= max_threads; ++nt) {
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < nt; ++i) pthread_create(&th[i], NULL, run, &sink[i]);
    for (int i = 0; i < nt; ++i) pthread_join(th[i], NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    const double s = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
    printf("%d thread(s): %.1f GFLOP/s float32 FMA peak\n", nt, nt * (double)ITERS * ACC * 8 * 2 / s / 1e9);
  }
  return 0;
}
