/* Fused sparse attention for the CPU, forward and backward, float32 (paper section 5.5).
 *
 * Any pattern, read from its description (patterns/tiles.py), in up to two passes:
 *   tile pass     the queries in tiles of TQ; a tile reads a few intervals of
 *                 keys, each contiguous in the sequence or in one gathered view
 *                 (the summary columns of the fixed pattern), and each with its
 *                 rule: every key, a causal band, or a byte mask;
 *   column pass   view the sequence as [N/l, l] and transpose it: column c
 *                 holds positions c, c+l, c+2l, ...; a query attends the
 *                 earlier positions of its column (strictly earlier when the
 *                 tile pass already has the diagonal): strided's second factor.
 * Each pass computes an exact softmax over all of its keys at once, and the
 * column pass merges its result into the tile pass's through the log-sum-exps.
 * Nothing of size N x N exists and no key outside the description is read:
 * the upper triangle is never computed.
 *
 * Layout: k, v, dk, dv are [BH][N][HD] contiguous float32; the queries are
 * positions q0..N-1 (q0 a multiple of TQ; 0 for self-attention): q, o, do, dq
 * are [BH][N - q0][HD] and lse [BH][N - q0]. N is a multiple of l for the column pass. HD (the head
 * width) is fixed at compile time (-DHD=64); it must be a multiple of 16.
 * Plain C with GCC/Clang vector extensions, OpenMP for the threads; the
 * vector width follows the target instruction set (see VL below).
 *
 * This file holds the instruction-set settings, the vector helpers and the entry points. It includes
 * its parts, one translation unit compiled once (build.py keys the build on all of them):
 *   gemm.c            register-blocked products (band-limited) and the tile transposes
 *   softmax.c         base-2 exponentials and the softmax of a tile, forward and backward
 *   columns.c         one tile against a window of keys; the column pass
 *   tiles.c           the tile pass, one tile at a time, from a description
 *   tiles_parallel.c  the tile pass over sequences and threads
 *   decode.c          one decoding step over a cache's segments
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
#endif

#ifndef HD
#error "compile with -DHD=<head width, a multiple of 16>"
#endif
#if HD % 16 != 0
#error "HD must be a multiple of 16"
#endif

/* The vector width and the register blocking of the GEMM micro-kernel follow
 * the instruction set the compiler targets (-march / -mcpu):
 *   AVX-512      16 floats, 32 registers: blocks of 6 rows x 4 vectors (24
 *                accumulators, 4 for B; 4 x 4 was 5-9% slower in the tile
 *                products on an Intel Xeon), or 8 rows x 2 vectors when C is 2
 *                vectors wide;
 *   AVX2 + FMA    8 floats, 16 registers: 6 rows x 2 vectors (12 accumulators,
 *                2 for B, 1 for the broadcast of A), the classic AVX2 sgemm shape;
 *   arm64 NEON    4 floats, 32 registers: 4 rows x 4 vectors (16 accumulators);
 *   anything else 4 floats (SSE2, or whatever the compiler makes of the vector
 *                extension), 4 rows x 2 vectors.
 * A block that needs more registers than exist spills on every FMA: 4 x 4
 * blocks of 16 floats compiled for AVX2 ran 20x slower than this. */
#if defined(VL)  /* all six given with -D, for experiments */
#elif defined(__AVX512F__)
#define VL 16
#define TQ 64         /* queries per tile (see the note on TQ below) */
#define MR_WIDE 6
#define NV_WIDE 4
#define MR_NARROW 8   /* when C is at most 2 vectors wide */
#define NV_NARROW 2
#elif defined(__AVX2__) && defined(__FMA__)
#define VL 8
#define TQ 32
#define MR_WIDE 6
#define NV_WIDE 2
#define MR_NARROW 6
#define NV_NARROW 2
#elif defined(__ARM_NEON) || defined(__ARM_NEON__)
#define VL 4
#define TQ 16
#define MR_WIDE 4
#define NV_WIDE 4
#define MR_NARROW 8
#define NV_NARROW 2
#else
#define VL 4
#define TQ 16
#define MR_WIDE 4
#define NV_WIDE 2
#define MR_NARROW 4
#define NV_NARROW 2
#endif

/* TQ: a wider tile of queries reads each key and value row once for more queries, which pays on long
 * intervals of keys. A narrower one wastes fewer keys at the ends of a local window. On an Intel Xeon
 * (2026-12-04), doubling TQ to 64 (AVX-512) and 32 (AVX2) ran Fixed(1024, 32) at 524,288 positions
 * 9% and 13% faster, and Fixed(1024, 32) at a million 89 -> 71 s at AVX-512. Strided(128), Fixed(128, 16),
 * BigBird and Longformer at 16,384 rose 1-5 points of the matrix-product rate. At 4,096, Local(128) fell
 * 5 points at AVX2. TQ 128 was slower than 64. */

/* Which build this is, for the loader to check: floats per vector. */
int st_vector_width(void) { return VL; }

typedef float vf __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));

static inline vf ld(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* A streaming store (x86: around the caches, no read of the line first) of a vector to p, aligned to
 * the vector (callers check), for rows written far apart that nothing reads again soon; a plain store
 * elsewhere. fence_streams() orders them before the memory is read by another thread or pass. */
#if defined(__AVX512F__) && VL == 16
static inline void st_stream(float *p, vf v) { _mm512_stream_ps(p, (__m512)v); }
static inline void fence_streams(void) { _mm_sfence(); }
#elif defined(__AVX__) && VL == 8
static inline void st_stream(float *p, vf v) { _mm256_stream_ps(p, (__m256)v); }
static inline void fence_streams(void) { _mm_sfence(); }
#else
static inline void st_stream(float *p, vf v) { st(p, v); }
static inline void fence_streams(void) {}
#endif
static inline int vec_aligned(const void *p) { return ((uintptr_t)p & (VL * 4 - 1)) == 0; }
static inline vf splat(float x) { vf v = {0}; return v + x; }
static inline int imin(int a, int b) { return a < b ? a : b; }
static inline int imax(int a, int b) { return a > b ? a : b; }

/* Every scratch buffer starts on a 64-byte cache line. glibc's malloc aligns to 16 bytes only, so
 * a vector of 16 floats read from its buffers spanned two lines, every one of them (scores,
 * transposed queries): on an Intel Xeon at AVX-512, aligning them ran Strided(128) and Local(128)
 * at 16,384 fwd+bwd 11-17% faster. No change at AVX2 (32-byte vectors split half as often). */
static void *amalloc(size_t n)
{
    void *p = NULL;
    return posix_memalign(&p, 64, (n + 63) / 64 * 64) ? NULL : p;
}
static void *acalloc(size_t count, size_t size)
{
    void *p = amalloc(count * size);
    if (p) memset(p, 0, count * size);
    return p;
}
#define malloc(n) amalloc(n)
#define calloc(c, n) acalloc(c, n)

/* Left alone, GCC folds the loads of B into every FMA that uses them (MR
 * loads of each vector instead of one), and the micro-kernel becomes bound by
 * loads: this empty asm pins the vector in a register (2x faster, AVX-512). */
#if (defined(__GNUC__) || defined(__clang__)) && defined(__AVX512F__)
#define KEEP_IN_REGISTER(x) __asm__("" : "+v"(x))
#elif (defined(__GNUC__) || defined(__clang__)) && defined(__AVX2__)
#define KEEP_IN_REGISTER(x) __asm__("" : "+x"(x))
#elif (defined(__GNUC__) || defined(__clang__)) && defined(__aarch64__)
#define KEEP_IN_REGISTER(x) __asm__("" : "+w"(x))
#else
#define KEEP_IN_REGISTER(x) ((void)0)
#endif

/* The parts, in the order each needs the one before. */
#include "gemm.c"
#include "softmax.c"
#include "columns.c"
#include "tiles.c"
#include "tiles_parallel.c"

/* ------------------------------------------------------------ entry points
 * The tile pass, then (l > 0) the column pass of stride l (window cw, 0: whole columns) merged
 * into it through the log-sum-exps (Strided: a band plus the columns). Returns 0, or -1 without memory. */
int st_tiles_forward(int BH, int N, int ntiles, int maxw, int ng, const int *ptr, const int *iv, const int *gpos,
                     const uint8_t *masks, int l, int strict, int cw, int q0, float scale, int nthreads,
                     const float *q, const float *k, const float *v, float *o, float *lse)
{
    Desc d = {N, ntiles, maxw, ng, q0, ptr, iv, gpos, masks, scale};
    Shape sh = {N, l, strict, cw, q0, scale};
    int failed = ntiles > 0 ? tiles_forward(&d, BH, nthreads, q, k, v, o, lse) : 0;
    if (l > 0 && !failed) {
        Tensors t = {q, k, v, NULL, NULL, NULL, o, lse, NULL, NULL, NULL};
        failed = col_pass(&sh, &t, BH, nthreads, 0, ntiles > 0);
    }
    return failed ? -1 : 0;
}

/* p[0..n) = 0, in nthreads pieces. */
static void zero_par(float *p, size_t n, int nthreads)
{
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int i = 0; i < nthreads; i++) {
        size_t a = n * i / nthreads, b = n * (i + 1) / nthreads;
        memset(p + a, 0, sizeof(float) * (b - a));
    }
}

int st_tiles_backward(int BH, int N, int ntiles, int maxw, int ng, const int *ptr, const int *iv, const int *gpos,
                      const uint8_t *masks, int l, int strict, int cw, int q0, float scale, int nthreads,
                      const float *q, const float *k, const float *v, const float *o, const float *dout,
                      const float *lse, float *dq, float *dk, float *dv)
{
    Desc d = {N, ntiles, maxw, ng, q0, ptr, iv, gpos, masks, scale};
    Shape sh = {N, l, strict, cw, q0, scale};
    float *delta = malloc(sizeof(float) * (size_t)BH * (N - q0));
    if (!delta) return -1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long i = 0; i < (long)BH * (N - q0); i++) {
        const float *a = o + i * HD, *b = dout + i * HD;
        vf acc = splat(0.f);
        for (int c = 0; c < HD; c += VL) acc += ld(a + c) * ld(b + c);
        float s = 0;
        for (int t = 0; t < VL; t++) s += acc[t];
        delta[i] = s;
    }
    /* dq, dk, dv come uninitialised. With columns covering every row once (N a multiple of l), the
     * column pass goes first and stores its gradients, which saves clearing them and reading them
     * back; the tile pass adds to them. */
    int cols_first = l > 0 && N % l == 0, failed = 0;
    Tensors t = {q, k, v, dout, lse, delta, NULL, NULL, dq, dk, dv};
    if (cols_first) {
        failed = col_pass(&sh, &t, BH, nthreads, 1, 0);
    } else {
        zero_par(dq, (size_t)BH * (N - q0) * HD, nthreads);
        zero_par(dk, (size_t)BH * N * HD, nthreads);
        zero_par(dv, (size_t)BH * N * HD, nthreads);
    }
    if (ntiles > 0 && !failed) failed = tiles_backward(&d, BH, nthreads, q, k, v, dout, lse, delta, dq, dk, dv);
    if (l > 0 && !cols_first && !failed) failed = col_pass(&sh, &t, BH, nthreads, 1, 1);
    free(delta);
    return failed ? -1 : 0;
}

int st_query_tile(void) { return TQ; }

/* ------------------------------------------------------------ decoding */
#include "decode.c"
