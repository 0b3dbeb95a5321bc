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
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
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

/* ------------------------------------------------------------------ GEMM
 * C[M][N] (+)= op(A)[M][K] B[K][N], N a multiple of VL, row-major with
 * leading dimensions; op(A) = A (gemm_nn) or A read transposed, A[k][m]
 * (gemm_tn). Register blocks of mb <= 8 rows x nvb <= 4 vectors (above).
 *
 * A band (Rng) says that row i of C needs only the part [i + lo, i + hi] of
 * the sum over K (RNG_K) or of the columns N (RNG_N); the rest of A or C is
 * zero or unused. Inside a tile, query a attends keys [a + lo, a + hi] of a
 * causal band (local positions), so a block of 6 rows reads 133 keys of
 * Local(128)'s 159 instead of all of them; the scores a key block skips are
 * masked by the softmax, which reads them under its masks only. */
enum { RNG_K = 1, RNG_N = 2 };
typedef struct { int mode, lo, hi; } Rng;
#define UNBOUNDED (1 << 29) /* a side with no bound: lo = -UNBOUNDED, hi = UNBOUNDED */

/* Queries attend keys [a + lo, a + hi]: for products whose rows are the queries and K the keys... */
static inline Rng q_rows(int lo, int hi) { return (Rng){RNG_K, lo, hi}; }
/* ... and for those whose rows are the keys: the queries are the sum (RNG_K) or the columns (RNG_N). */
static inline Rng k_rows(int mode, int lo, int hi) { return (Rng){mode, -hi, -lo}; }

static inline __attribute__((always_inline)) void
micro(int mb, int nvb, int at, int K, const float *A, int lda, const float *B, int ldb, float *C, int ldc, int acc)
{
    vf c[8][4];
    for (int r = 0; r < 8; r++)
        for (int v = 0; v < 4; v++) c[r][v] = splat(0.f);
    for (int k = 0; k < K; k++) {
        vf b[4];
        for (int v = 0; v < 4; v++)
            if (v < nvb) { b[v] = ld(B + (size_t)k * ldb + v * VL); KEEP_IN_REGISTER(b[v]); }
        for (int r = 0; r < 8; r++) {
            if (r >= mb) break;
            float a = at ? A[(size_t)k * lda + r] : A[(size_t)r * lda + k];
            for (int v = 0; v < 4; v++)
                if (v < nvb) c[r][v] += a * b[v];
        }
    }
    for (int r = 0; r < mb; r++)
        for (int v = 0; v < nvb; v++) {
            float *p = C + (size_t)r * ldc + v * VL;
            st(p, acc ? ld(p) + c[r][v] : c[r][v]);
        }
}

/* The part [*x0, *x1) of 0..n that rows i..i+mb-1 need under band g (the whole of it for other modes). */
static inline void band_part(Rng g, int mode, int i, int mb, int n, int *x0, int *x1)
{
    *x0 = 0;
    *x1 = n;
    if (g.mode != mode) return;
    *x0 = imax(0, imin(n, i + g.lo));
    *x1 = imax(*x0, imin(n, i + mb + g.hi));
}

/* A product read transposed (P V, dS K: the sum runs over a tile's keys) takes its sum KC keys at a
 * time, each slice for every block of rows, so that the slice of B (the values or keys, KC x HD) and
 * of A stay in L1 while the row blocks reuse them: taken whole, a group of 2,048 keys was read from
 * L2 once per block of rows. */
#ifndef KC
#define KC 128
#endif

/* One case per block shape the drivers can ask for: mb <= 8 rows, nvb <= 4. */
#define MC(mb, nvb, at) case (mb) * 8 + (nvb): micro(mb, nvb, at, k1 - k0, a, lda, b, ldb, c, ldc, acc); break;
#define MC4(mb, at) MC(mb, 4, at) MC(mb, 3, at) MC(mb, 2, at) MC(mb, 1, at)
/* RK: this driver takes bands over K (RNG_K); else over N (RNG_N). Fixed at compile time, so that a
 * product over K = HD keeps its constant trip count (a band over K there cost 5% in Fixed's backward).
 * name##_part sums over k0..k1-1 only. */
#define GEMM(name, AT, RK)                                                                          \
static void name##_part(int M, int N, int K, int kc0, int kc1, const float *A, int lda, const float *B, int ldb, \
                        float *C, int ldc, int acc, Rng g)                                          \
{                                                                                                   \
    int narrow = N <= 2 * VL, rs = narrow ? MR_NARROW : MR_WIDE, nvmax = narrow ? NV_NARROW : NV_WIDE; \
    for (int i = 0; i < M; i += rs) {                                                               \
        int mb = imin(rs, M - i), k0 = kc0, k1 = kc1, n0 = 0, n1 = N;                               \
        if (RK) {                                                                                   \
            band_part(g, RNG_K, i, mb, K, &k0, &k1);                                                \
            k0 = imax(k0, kc0);                                                                     \
            k1 = imax(k0, imin(k1, kc1));                                                           \
            if (k1 == k0 && acc) continue;                                                          \
        } else {                                                                                    \
            band_part(g, RNG_N, i, mb, N, &n0, &n1);                                                \
            n0 = n0 / VL * VL;                                                                      \
            n1 = imin(N, (n1 + VL - 1) / VL * VL);                                                  \
        }                                                                                           \
        for (int j = n0; j < n1; j += nvmax * VL) {                                                 \
            int nvb = imin(nvmax, (n1 - j) / VL);                                                   \
            const float *a = AT ? A + i + (size_t)k0 * lda : A + (size_t)i * lda + k0, *b = B + (size_t)k0 * ldb + j; \
            float *c = C + (size_t)i * ldc + j;                                                     \
            switch (mb * 8 + nvb) {                                                                 \
                MC4(8, AT) MC4(7, AT) MC4(6, AT) MC4(5, AT)                                         \
                MC4(4, AT) MC4(3, AT) MC4(2, AT) MC4(1, AT)                                         \
            }                                                                                       \
        }                                                                                           \
    }                                                                                               \
}                                                                                                   \
static void name(int M, int N, int K, const float *A, int lda, const float *B, int ldb, float *C, int ldc, int acc, \
                 Rng g)                                                                             \
{                                                                                                   \
    if (!AT || K <= KC) {                                                                           \
        name##_part(M, N, K, 0, K, A, lda, B, ldb, C, ldc, acc, g);                                 \
        return;                                                                                     \
    }                                                                                               \
    if (!acc)                                                                                       \
        for (int r = 0; r < M; r++) memset(C + (size_t)r * ldc, 0, sizeof(float) * N);             \
    for (int kc0 = 0; kc0 < K; kc0 += KC)                                                           \
        name##_part(M, N, K, kc0, imin(K, kc0 + KC), A, lda, B, ldb, C, ldc, 1, g);                 \
}
GEMM(gemm_nn, 0, 0)   /* bands over the columns: the score products */
GEMM(gemm_nk, 0, 1)   /* bands over the sum: dV += P^T dO, dK += dS^T Q */
GEMM(gemm_tn, 1, 1)   /* bands over the sum: O = P V, dQ += dS K */

/* dst[c][r] = mul * src[r][c] for r < R, c < HD (dst has TQ columns; columns R.. are zeroed).
 * Where the compiler has __builtin_shufflevector (Clang, GCC 12+), full VL x VL
 * blocks are transposed in registers in log2(VL) stages; stage b swaps the
 * off-diagonal sub-blocks of width b between rows i and i + b. */
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define SX(b, j) (((j) & (b)) ? VL + (j) - (b) : (j))  /* row i: its own even blocks, row i+b's even blocks */
#define SY(b, j) (((j) & (b)) ? VL + (j) : (j) + (b))  /* row i+b: row i's odd blocks, its own odd blocks */
#define IDX4(F, b) F(b, 0), F(b, 1), F(b, 2), F(b, 3)
#define IDX8(F, b) IDX4(F, b), F(b, 4), F(b, 5), F(b, 6), F(b, 7)
#define IDX16(F, b) IDX8(F, b), F(b, 8), F(b, 9), F(b, 10), F(b, 11), F(b, 12), F(b, 13), F(b, 14), F(b, 15)
#if VL == 4
#define IDX IDX4
#define STAGES STAGE(2) STAGE(1)
#elif VL == 8
#define IDX IDX8
#define STAGES STAGE(4) STAGE(2) STAGE(1)
#elif VL == 16
#define IDX IDX16
#define STAGES STAGE(8) STAGE(4) STAGE(2) STAGE(1)
#endif
#endif
#ifdef IDX
#define STAGE(b)                                                                  \
    for (int i = 0; i < VL; i++)                                                  \
        if (!(i & (b))) {                                             \
            vf a = x[i], c = x[i + (b)];                                          \
            x[i] = __builtin_shufflevector(a, c, IDX(SX, b));                     \
            x[i + (b)] = __builtin_shufflevector(a, c, IDX(SY, b));               \
        }
static inline void transpose_block(const float *src, float *dst, float mul)
{
    vf x[VL];
    for (int r = 0; r < VL; r++) x[r] = ld(src + (size_t)r * HD) * mul;
    STAGES
    for (int r = 0; r < VL; r++) st(dst + (size_t)r * TQ, x[r]);
}
#endif

static void transpose_tile(const float *src, int R, float *dst, float mul)
{
    int r0 = 0;
#ifdef IDX
    for (; r0 + VL <= R; r0 += VL)
        for (int c = 0; c < HD; c += VL) transpose_block(src + (size_t)r0 * HD + c, dst + (size_t)c * TQ + r0, mul);
#endif
    for (int c = 0; c < HD; c++) {
        for (int r = r0; r < R; r++) dst[c * TQ + r] = mul * src[(size_t)r * HD + c];
        for (int r = imax(R, r0); r < TQ; r++) dst[c * TQ + r] = 0.f;
    }
}

/* --------------------------------------------------------------- softmax
 * Scores are kept transposed, St[j][a] for key j and query a of a tile
 * (TQ / VL vectors of queries), so the softmax over keys runs down the
 * columns: vectorised over queries, with no horizontal reductions. Query a
 * may attend keys lo[a]..hi[a]. The scores are in base 2: the queries are
 * multiplied by scale * log2(e) as they are transposed, so the softmax needs
 * no multiplication per score and exponentiates with 2^x. The log-sum-exps
 * it returns are natural (they are merged and saved in that unit). */
#define LOG2E 1.44269504088896341f
#define LN2 0.69314718055994531f
static inline vf vsel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
static inline vf vmax(vf a, vf b) { return vsel(a > b, a, b); }
static inline vf vand(vf a, vi m) { return (vf)((vi)a & m); }
static inline vi isplat(int x) { vi v = {0}; return v + x; }

static inline vf vexp2(vf x)
{
    /* 2^x for x <= 0 (the callers subtract the maximum or the log-sum-exp, so
     * x exceeds 0 by rounding at most): 2^x = 2^n 2^r with n = round(x),
     * |r| <= 1/2, and a degree-5 minimax polynomial for 2^r (relative error
     * 2.3e-7 in float32). x is clamped below at -126. NaN stays NaN (the
     * comparison is false for it), so a NaN score of an allowed key makes its
     * query's output NaN instead of vanishing; the callers zero the entries of
     * keys a query may not attend with a bit mask, which clears NaN too. */
    x = vsel(x < splat(-126.0f), splat(-126.0f), x);
    const vf magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    vf n = (x + magic) - magic;
    vf r = x - n;
    vf p = splat(1.327647178127566e-3f);
    p = p * r + 9.6755413327614948e-3f;
    p = p * r + 5.5507132741512054e-2f;
    p = p * r + 2.4022119723882102e-1f;
    p = p * r + 6.9314696706436041e-1f;
    p = p * r + 1.0000000716546726f;
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return p * (vf)e;
}

/* The keys every query of a vector group may attend: [*a, *b] (empty if *a > *b).
 * Inside it the softmax loops need no mask. */
static inline void common_keys(vi vlo, vi vhi, int W, int *a, int *b)
{
    int lo = 0, hi = W - 1;
    for (int t = 0; t < VL; t++) { lo = imax(lo, vlo[t]); hi = imin(hi, vhi[t]); }
    *a = lo;
    *b = hi;
}

/* The natural log-sum-exp and 1/sum of VL queries from their maximum m (base 2) and sum of
 * 2^(s - m). The sum is 0 only for a query with no key (-inf, 0); NaN (a NaN score) stays NaN. */
static inline void finish_rows(vf m, vf sum, float *lse, float *inv)
{
    for (int t = 0; t < VL; t++) {
        lse[t] = sum[t] == 0 ? -INFINITY : (m[t] + log2f(sum[t])) * LN2;
        inv[t] = sum[t] == 0 ? 0.f : 1.0f / sum[t];
    }
}

/* Forward: leaves unnormalised probabilities in St (0 where not allowed),
 * the log-sum-exp of each query in lse (-inf: no key) and 1/sum in inv (0: no key). */
static void softmax_cols(float *St, int W, const int *lo, const int *hi, float *lse, float *inv)
{
    for (int v = 0; v < TQ / VL; v++) {
        vi vlo, vhi;
        memcpy(&vlo, lo + v * VL, sizeof vlo);
        memcpy(&vhi, hi + v * VL, sizeof vhi);
        int ja, jb;
        common_keys(vlo, vhi, W, &ja, &jb);
        vf m = splat(-INFINITY);
        for (int j = 0; j < W; j++) {
            if (j == ja && ja <= jb) { /* the keys every query may attend: no mask */
                for (; j <= jb; j++) m = vmax(m, ld(St + (size_t)j * TQ + v * VL));
                if (j >= W) break;
            }
            vi ok = (isplat(j) >= vlo) & (isplat(j) <= vhi);
            m = vmax(m, vsel(ok, ld(St + (size_t)j * TQ + v * VL), splat(-INFINITY)));
        }
        vf sum = splat(0.f);
        for (int j = 0; j < W; j++) {
            if (j == ja && ja <= jb) {
                for (; j <= jb; j++) {
                    float *p = St + (size_t)j * TQ + v * VL;
                    vf e = vexp2(ld(p) - m);
                    sum += e;
                    st(p, e);
                }
                if (j >= W) break;
            }
            float *p = St + (size_t)j * TQ + v * VL;
            vi ok = (isplat(j) >= vlo) & (isplat(j) <= vhi);
            vf e = vand(vexp2(ld(p) - m), ok);
            sum += e;
            st(p, e);
        }
        finish_rows(m, sum, lse + v * VL, inv + v * VL);
    }
}

/* Backward: P = 2^(S - lse log2 e) in St (S in base 2), dS = P * (dP - delta) * scale in dPt. */
static void grad_cols(float *St, float *dPt, int W, const int *lo, const int *hi, float scale, const float *lse, const float *delta)
{
    for (int v = 0; v < TQ / VL; v++) {
        vi vlo, vhi;
        memcpy(&vlo, lo + v * VL, sizeof vlo);
        memcpy(&vhi, hi + v * VL, sizeof vhi);
        vf L = ld(lse + v * VL) * LOG2E, D = ld(delta + v * VL);
        vi fin = (L > splat(-INFINITY)) & (L < splat(INFINITY));
        int ja, jb;
        common_keys(vlo, vhi, W, &ja, &jb); /* these keys have finite log-sum-exps too */
        for (int j = 0; j < W; j++) {
            if (j == ja && ja <= jb) {
                for (; j <= jb; j++) {
                    float *ps = St + (size_t)j * TQ + v * VL, *pd = dPt + (size_t)j * TQ + v * VL;
                    vf p = vexp2(ld(ps) - L);
                    st(ps, p);
                    st(pd, p * (ld(pd) - D) * scale);
                }
                if (j >= W) break;
            }
            float *ps = St + (size_t)j * TQ + v * VL, *pd = dPt + (size_t)j * TQ + v * VL;
            vi ok = (isplat(j) >= vlo) & (isplat(j) <= vhi) & fin;
            vf p = vand(vexp2(ld(ps) - L), ok);
            st(ps, p);
            st(pd, vand(p * (ld(pd) - D) * scale, ok));
        }
    }
}

static void scale_rows(float *O, int rows, const float *inv)
{
    for (int a = 0; a < rows; a++)
        for (int d = 0; d < HD; d += VL) st(O + (size_t)a * HD + d, ld(O + (size_t)a * HD + d) * inv[a]);
}

/* ------------------------------------------------------------ tile work
 * One tile: queries Qr[rows] (rows <= TQ) against keys Kr, Vr [W]; query a
 * may attend keys lo[a]..hi[a]. Forward writes the normalised output to
 * Or and returns lse; backward adds into dQr, dKr, dVr. */
typedef struct {
    int N, l, strict, w; /* w: the column pass's window (0: the whole column) */
    int q0;              /* queries are positions q0..N-1: rows i - q0 of q, o, lse, dq, dout */
    float scale;
} Shape;

typedef struct {
    float Qt[HD * TQ], dOt[HD * TQ], lse[TQ], inv[TQ], delta[TQ];
    int lo[TQ], hi[TQ];
} TileScratch;

static void tile_fwd(const float *Qr, const float *Kr, const float *Vr, int rows, int W, TileScratch *ts,
                     float *St, float *Or, float scale, int qlo, int qhi)
{
    transpose_tile(Qr, rows, ts->Qt, scale * LOG2E);
    gemm_nn(W, TQ, HD, Kr, HD, ts->Qt, TQ, St, TQ, 0, k_rows(RNG_N, qlo, qhi));  /* St = K Q^T   (W, TQ) */
    softmax_cols(St, W, ts->lo, ts->hi, ts->lse, ts->inv);
    gemm_tn(rows, HD, W, St, TQ, Vr, HD, Or, HD, 0, q_rows(qlo, qhi));          /* O = P V      (rows, HD) */
    scale_rows(Or, rows, ts->inv);
}

static void tile_bwd(const float *Qr, const float *Kr, const float *Vr, const float *dOr, int rows, int W,
                     TileScratch *ts, float *St, float *dPt, float *dQr, float *dKr, float *dVr, int ldd, float scale,
                     int qlo, int qhi)
{
    Rng n = k_rows(RNG_N, qlo, qhi), k = k_rows(RNG_K, qlo, qhi);
    transpose_tile(Qr, rows, ts->Qt, scale * LOG2E);
    transpose_tile(dOr, rows, ts->dOt, 1.0f);
    gemm_nn(W, TQ, HD, Kr, HD, ts->Qt, TQ, St, TQ, 0, n);                 /* S^T  = K Q^T    (W, TQ) */
    gemm_nn(W, TQ, HD, Vr, HD, ts->dOt, TQ, dPt, TQ, 0, n);               /* dP^T = V dO^T   (W, TQ) */
    grad_cols(St, dPt, W, ts->lo, ts->hi, scale, ts->lse, ts->delta);
    gemm_tn(rows, HD, W, dPt, TQ, Kr, HD, dQr, ldd, 1, q_rows(qlo, qhi)); /* dQ += dS K      (rows, HD) */
    gemm_nk(W, HD, rows, St, TQ, dOr, HD, dVr, ldd, 1, k);                /* dV += P^T dO    (W, HD) */
    gemm_nk(W, HD, rows, dPt, TQ, Qr, HD, dKr, ldd, 1, k);                /* dK += dS^T Q    (W, HD) */
}

/* Column pass: the M = N / l positions c, c+l, ... of one column, gathered. Its log-sum-exps and
 * deltas take M rounded up to 16 floats each, and the whole to a multiple of 16, so that every array
 * of rows in it starts on a cache line. */
static size_t pad16(size_t m) { return (m + 15) / 16 * 16; }
static size_t col_buf_floats(int M)
{
    return pad16(sizeof(TileScratch) / sizeof(float) + 7 * (size_t)M * HD + 2 * (size_t)M * TQ + TQ * HD +
                 2 * pad16(M) + 64);
}

/* A work item of the column pass is a group of up to CG consecutive columns c0..c0+n-1 of one
 * sequence, each with its own scratch (col_buf_floats). Row m of the group's columns is the n rows
 * m*l + c0 ... m*l + c0 + n - 1 of the sequence, one piece of n * HD floats: the group gathers and
 * scatters it in one go rather than in n pieces 32 KB apart (l = 128), which the hardware
 * prefetchers do not follow (one column at a time, the gathers took 13% of Strided(128)'s forward
 * on an Intel Xeon). */
#ifndef CG
#define CG 8      /* at most, and at most 8 MB of scratch per thread; 4-16 ran within 2% of each other */
#endif

typedef struct {
    int c0, n;
    int first[CG]; /* the first row of each column that is a query (position >= q0) */
    float *buf[CG];
} ColGroup;

/* The first row of column c that is a query (position >= q0). */
static int first_query(const Shape *sh, int c) { return sh->q0 > c ? (sh->q0 - c + sh->l - 1) / sh->l : 0; }

/* A column's gathered rows: Q, K, V, dO (M x HD each) after its TileScratch. */
static float *col_rows(float *buf, int M, int which) { return (float *)((TileScratch *)buf + 1) + (size_t)which * M * HD; }

/* Rows m of the group's columns into array ``which`` of their buffers, from row m * l + c - q0 of X:
 * queries (``queries``: rows from first[g] on, q0 as given) or keys (every row, q0 = 0). */
static void gather_group(const ColGroup *cg, const Shape *sh, const float *X, int which, int queries)
{
    int l = sh->l, M = sh->N / l, q0 = queries ? sh->q0 : 0;
    for (int m = 0; m < M; m++)
        for (int g = 0; g < cg->n; g++) {
            if (queries && m < cg->first[g]) continue;
            memcpy(col_rows(cg->buf[g], M, which) + (size_t)m * HD, X + ((size_t)m * l + cg->c0 + g - q0) * HD,
                   sizeof(float) * HD);
        }
}

/* Queries m0..m0+TQ-1 of a column attend keys m-w < j <= m (w = 0: from 0), strictly before m
 * when strict; they are read from key j0 on. Returns the key count; query a attends the keys
 * [a + *qlo, a + *qhi] of those read (its band for the products). */
static int col_window(const Shape *sh, int m0, int M, TileScratch *ts, int *rows, int *j0, int *qlo, int *qhi)
{
    int m1 = imin(m0 + TQ, M);
    *rows = m1 - m0;
    *j0 = sh->w > 0 ? imax(0, m0 - sh->w + 1) : 0;
    *qlo = sh->w > 0 ? m0 - sh->w + 1 - *j0 : -UNBOUNDED;
    *qhi = m0 - *j0 - (sh->strict ? 1 : 0);
    for (int a = 0; a < TQ; a++) {
        int m = m0 + a;
        ts->lo[a] = a < *rows ? (sh->w > 0 ? imax(0, m - sh->w + 1) : 0) - *j0 : 1;
        ts->hi[a] = a < *rows ? (sh->strict ? m - 1 : m) - *j0 : 0;
    }
    return (sh->strict ? m1 - 1 : m1) - *j0;
}

/* A column's forward results in its buffer, after its scores: the output Oc (M x HD) and the
 * log-sum-exps Lc (M). */
static float *col_out(float *buf, int M) { return col_rows(buf, M, 3) + (size_t)M * TQ; }
static float *col_lse(float *buf, int M) { return col_out(buf, M) + (size_t)M * HD; }

/* Column c, its rows gathered in buf: attention over the column, into its Oc and Lc. */
static void col_fwd(const Shape *sh, int c, float *buf)
{
    int M = sh->N / sh->l;
    TileScratch *ts = (TileScratch *)buf;
    float *Qc = col_rows(buf, M, 0), *Kc = col_rows(buf, M, 1), *Vc = col_rows(buf, M, 2);
    float *St = col_rows(buf, M, 3), *Oc = col_out(buf, M), *Lc = col_lse(buf, M);
    for (int m0 = first_query(sh, c); m0 < M; m0 += TQ) {
        int rows, j0, qlo, qhi, W = col_window(sh, m0, M, ts, &rows, &j0, &qlo, &qhi);
        if (W > 0) {
            tile_fwd(Qc + (size_t)m0 * HD, Kc + (size_t)j0 * HD, Vc + (size_t)j0 * HD, rows, W, ts, St,
                     Oc + (size_t)m0 * HD, sh->scale, qlo, qhi);
            memcpy(Lc + m0, ts->lse, sizeof(float) * rows);
        } else {
            for (int a = 0; a < rows; a++) Lc[m0 + a] = -INFINITY;
        }
    }
}

/* The group's column outputs into O, L (written, or merged with what the tile pass left there
 * through the log-sum-exps), row by row of the sequence, as scatter_group does. */
static void put_group(const ColGroup *cg, const Shape *sh, float *O, float *L, int merge)
{
    int l = sh->l, M = sh->N / l;
    for (int m = 0; m < M; m++)
        for (int g = 0; g < cg->n; g++) {
            if (m < cg->first[g]) continue;
            size_t i = (size_t)m * l + cg->c0 + g - sh->q0; /* the row of this query */
            float *o = O + i * HD, *oc = col_out(cg->buf[g], M) + (size_t)m * HD, l2 = col_lse(cg->buf[g], M)[m];
            if (!merge) {
                if (isinf(l2)) memset(o, 0, sizeof(float) * HD);
                else memcpy(o, oc, sizeof(float) * HD);
                L[i] = l2;
            } else if (!isinf(l2)) {
                float l1 = L[i], mx = l1 > l2 ? l1 : l2;
                float e1 = expf(l1 - mx), e2 = expf(l2 - mx), tot = e1 + e2;
                vf w1 = splat(e1 / tot), w2 = splat(e2 / tot);
                for (int d = 0; d < HD; d += VL) st(o + d, ld(o + d) * w1 + ld(oc + d) * w2);
                L[i] = mx + logf(tot);
            }
        }
}

/* Column c, its rows gathered in buf: the gradients, added up in the column's own contiguous rows
 * dQc, dKc, dVc of buf (not in dQ, dK, dV themselves, where a column's rows lie l * HD floats apart:
 * 32 KB for l = 128, a few cache sets for all of them). */
static void col_bwd(const Shape *sh, const float *L, const float *Dl, int c, float *buf)
{
    int l = sh->l, M = sh->N / l;
    TileScratch *ts = (TileScratch *)buf;
    float *Qc = col_rows(buf, M, 0), *Kc = col_rows(buf, M, 1), *Vc = col_rows(buf, M, 2), *dOc = col_rows(buf, M, 3);
    float *St = dOc + (size_t)M * HD, *dPt = St + (size_t)M * TQ, *Lc = dPt + (size_t)M * TQ, *Dc = Lc + pad16(M);
    float *dQc = Dc + pad16(M), *dKc = dQc + (size_t)M * HD, *dVc = dKc + (size_t)M * HD;
    int ms = first_query(sh, c), q0 = sh->q0;
    memset(dQc, 0, sizeof(float) * 3 * (size_t)M * HD);
    for (int m = ms; m < M; m++) { Lc[m] = L[(size_t)m * l + c - q0]; Dc[m] = Dl[(size_t)m * l + c - q0]; }
    for (int m0 = ms; m0 < M; m0 += TQ) {
        int rows, j0, qlo, qhi, W = col_window(sh, m0, M, ts, &rows, &j0, &qlo, &qhi);
        if (W <= 0) continue;
        for (int a = 0; a < TQ; a++) {
            ts->lse[a] = a < rows ? Lc[m0 + a] : 0.f;
            ts->delta[a] = a < rows ? Dc[m0 + a] : 0.f;
        }
        tile_bwd(Qc + (size_t)m0 * HD, Kc + (size_t)j0 * HD, Vc + (size_t)j0 * HD, dOc + (size_t)m0 * HD, rows, W, ts,
                 St, dPt, dQc + (size_t)m0 * HD, dKc + (size_t)j0 * HD, dVc + (size_t)j0 * HD, HD, sh->scale, qlo, qhi);
    }
}

/* The group's column gradients, once into dQ, dK, dV (this thread owns these columns), row by row:
 * added to what is there (``add``), or stored, when the column pass comes first and every row of
 * the sequence lies in exactly one column. */
static void scatter_group(const ColGroup *cg, const Shape *sh, float *dQ, float *dK, float *dV, int add)
{
    int l = sh->l, M = sh->N / l;
    size_t grad = 4 * (size_t)M * HD + 2 * (size_t)M * TQ + 2 * pad16(M); /* dQc's offset after Q, K, V, dO */
    for (int m = 0; m < M; m++)
        for (int g = 0; g < cg->n; g++) {
            const float *dqc = col_rows(cg->buf[g], M, 0) + grad + (size_t)m * HD;
            const float *dkc = dqc + (size_t)M * HD, *dvc = dkc + (size_t)M * HD;
            size_t row = (size_t)m * l + cg->c0 + g;
            float *dk = dK + row * HD, *dv = dV + row * HD;
            if (add) {
                for (int d = 0; d < HD; d += VL) { st(dk + d, ld(dk + d) + ld(dkc + d)); st(dv + d, ld(dv + d) + ld(dvc + d)); }
            } else {
                memcpy(dk, dkc, sizeof(float) * HD);
                memcpy(dv, dvc, sizeof(float) * HD);
            }
            if (m >= cg->first[g]) {
                float *dq = dQ + (row - sh->q0) * HD;
                if (add) for (int d = 0; d < HD; d += VL) st(dq + d, ld(dq + d) + ld(dqc + d));
                else memcpy(dq, dqc, sizeof(float) * HD);
            }
        }
}

/* Every sequence's tensors, [BH][N][HD] (lse, delta [BH][N]); unused ones NULL. */
typedef struct {
    const float *q, *k, *v, *dout, *lse, *delta;
    float *o, *lse_out, *dq, *dk, *dv;
} Tensors;

/* The column pass over all sequences, in groups of columns (forward, or backward with ``backward``):
 * ``merge``: combine with what the tile pass left in O, lse (forward) or add to dQ, dK, dV (backward). */
static int col_pass(const Shape *sh, const Tensors *t, int BH, int nthreads, int backward, int merge)
{
    size_t per = col_buf_floats(sh->N / sh->l);
    int N = sh->N, l = sh->l, G = imin(imin(CG, l), imax(1, (int)((8u << 20) / (per * sizeof(float))))), failed = 0;
    int ngroups = (l + G - 1) / G;
    size_t NH = (size_t)N * HD, NQ = (size_t)(N - sh->q0); /* key rows, query rows per sequence */
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        float *buf = malloc(sizeof(float) * per * G);
        if (!buf) failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (long it = 0; it < (long)BH * ngroups; it++) {
            if (!buf) continue;
            long b = it / ngroups;
            ColGroup cg = {(int)(it % ngroups) * G, 0, {0}, {NULL}};
            cg.n = imin(G, l - cg.c0);
            for (int g = 0; g < cg.n; g++) { cg.buf[g] = buf + per * g; cg.first[g] = first_query(sh, cg.c0 + g); }
            const float *q = t->q + b * NQ * HD, *k = t->k + b * NH, *v = t->v + b * NH;
            gather_group(&cg, sh, q, 0, 1);
            gather_group(&cg, sh, k, 1, 0);
            gather_group(&cg, sh, v, 2, 0);
            if (backward) {
                gather_group(&cg, sh, t->dout + b * NQ * HD, 3, 1);
                for (int g = 0; g < cg.n; g++) col_bwd(sh, t->lse + b * NQ, t->delta + b * NQ, cg.c0 + g, cg.buf[g]);
                scatter_group(&cg, sh, t->dq + b * NQ * HD, t->dk + b * NH, t->dv + b * NH, merge);
            } else {
                for (int g = 0; g < cg.n; g++) col_fwd(sh, cg.c0 + g, cg.buf[g]);
                put_group(&cg, sh, t->o + b * NQ * HD, t->lse_out + b * NQ, merge);
            }
        }
        free(buf);
    }
    return failed;
}

/* ------------------------------------------------------------ tile pass
 * Any pattern, from its description (patterns/tiles.py): the queries are cut
 * into tiles of TQ; tile t reads the key intervals iv[ptr[t]] .. iv[ptr[t+1]-1],
 * each one contiguous either in the sequence itself (view 0) or in the
 * gathered key view G (view 1: rows gpos[0..], gathered once per sequence).
 * The intervals of a tile are disjoint, so one softmax over all of them is
 * exact: no merge. Each interval says which of its keys a query may attend:
 *   FULL      every key, every query of the tile;
 *   BAND w    kpos <= qpos and (w == 0 or qpos - kpos < w) (causal, windowed);
 *   MASK off  a TQ x len byte mask at masks + off (query-major).
 * Scores of all intervals sit one after another in St (rows = keys), so each
 * interval costs one GEMM per product, straight from its rows: nothing is copied. */
enum { IV_FULL = 0, IV_BAND = 1, IV_MASK = 2 };

typedef struct {
    int N, ntiles, maxw, ng, q0; /* queries are positions q0..N-1 (q0 a multiple of TQ) */
    const int *ptr, *iv, *gpos; /* iv: [n][5] = view, start, end, kind, arg */
    const uint8_t *masks;
    float scale;
} Desc;

/* Per key row j of the pieces pc[0..np) of the tile at query r0: full[j] = every query may attend it, else
 * the allowed lanes in Mt[j][0..TQ) (-1 / 0). Padded query lanes attend nothing. Returns the rows. */
static int tile_masks(const Desc *d, const int *pc, int np, int r0, int rows, int *full, int32_t *Mt)
{
    int W = 0;
    vi lane[TQ / VL], qpos[TQ / VL];
    for (int v = 0; v < TQ / VL; v++)
        for (int a = 0; a < VL; a++) { lane[v][a] = v * VL + a; qpos[v][a] = r0 + v * VL + a; }
    for (int x = 0; x < np; x++) {
        const int *e = pc + 5 * (size_t)x;
        int view = e[0], s = e[1], len = e[2] - e[1], kind = e[3], arg = e[4];
        /* BAND: the rows every real query may attend need no mask */
        int lo_all = r0 + rows - 1 - (arg > 0 ? arg - 1 : r0 + rows), hi_all = r0;
        for (int j = 0; j < len; j++, W++) {
            int kpos = view ? d->gpos[s + j] : s + j;
            if (kind == IV_FULL || (kind == IV_BAND && kpos <= hi_all && kpos >= lo_all)) { full[W] = 1; continue; }
            full[W] = 0;
            int32_t *m = Mt + (size_t)W * TQ;
            for (int v = 0; v < TQ / VL; v++) {
                vi ok;
                if (kind == IV_BAND) {
                    ok = (isplat(kpos) <= qpos[v]) & (lane[v] < isplat(rows));
                    if (arg > 0) ok &= (qpos[v] - isplat(kpos)) < isplat(arg);
                } else {
                    for (int a = 0; a < VL; a++) {
                        int q = v * VL + a;
                        ok[a] = q < rows && d->masks[(size_t)arg + (size_t)q * len + j] ? -1 : 0;
                    }
                }
                memcpy(m + v * VL, &ok, sizeof ok);
            }
        }
    }
    return W;
}

/* One group of keys of the forward: leaves unnormalised probabilities in St, relative to the running
 * maximum mrow (base 2), which it updates with the group's scores; srow, the running sum, is rescaled
 * to it and the group's sum added; factor = 2^(old max - new max) rescales what the output holds. */
static void softmax_group(float *St, int W, const int *full, const int32_t *Mt, float *mrow, float *srow,
                          float *factor)
{
    for (int v = 0; v < TQ / VL; v++) {
        vf mo = ld(mrow + v * VL), m = mo, sum = splat(0.f);
        for (int j = 0; j < W; j++) {
            vf s = ld(St + (size_t)j * TQ + v * VL);
            if (full[j]) { m = vmax(m, s); continue; }
            vi ok;
            memcpy(&ok, Mt + (size_t)j * TQ + v * VL, sizeof ok);
            m = vmax(m, vsel(ok, s, splat(-INFINITY)));
        }
        for (int j = 0; j < W; j++) {
            float *p = St + (size_t)j * TQ + v * VL;
            vf e = vexp2(ld(p) - m);
            if (!full[j]) {
                vi ok;
                memcpy(&ok, Mt + (size_t)j * TQ + v * VL, sizeof ok);
                e = vand(e, ok);
            }
            sum += e;
            st(p, e);
        }
        vf f = vsel(m > splat(-INFINITY), vexp2(mo - m), splat(1.f)); /* a query with no key yet: 1 */
        st(srow + v * VL, ld(srow + v * VL) * f + sum);
        st(mrow + v * VL, m);
        st(factor + v * VL, f);
    }
}

static void grad_masked(float *St, float *dPt, int W, const int *full, const int32_t *Mt, float scale,
                        const float *lse, const float *delta)
{
    for (int v = 0; v < TQ / VL; v++) {
        vf L = ld(lse + v * VL) * LOG2E, D = ld(delta + v * VL);
        vi fin = (L > splat(-INFINITY)) & (L < splat(INFINITY));
        for (int j = 0; j < W; j++) {
            float *ps = St + (size_t)j * TQ + v * VL, *pd = dPt + (size_t)j * TQ + v * VL;
            vf p = vexp2(ld(ps) - L);
            if (full[j]) {
                st(ps, p);
                st(pd, p * (ld(pd) - D) * scale);
                continue;
            }
            vi ok;
            memcpy(&ok, Mt + (size_t)j * TQ + v * VL, sizeof ok);
            ok &= fin;
            p = vand(p, ok);
            st(ps, p);
            st(pd, vand(p * (ld(pd) - D) * scale, ok));
        }
    }
}

/* One sequence's tensors for the tile pass; G* are its gathered views (ng rows). */
typedef struct {
    const float *q, *k, *v, *dout, *lse, *delta, *Gk, *Gv;
    float *o, *lse_out, *dq, *dk, *dv, *dGk, *dGv;
    size_t kbase; /* dk, dv hold the key rows from kbase on (a thread's private range) */
} Seq;

/* A tile's keys are taken in groups of at most CH rows, so that the scores of a group (CH x TQ
 * floats, 256 KB) stay in the core's L2 cache between the products and the softmax. A
 * tile of Fixed(1024, 32) at a million positions reads 33,792 keys: its scores in one piece (4.3 MB)
 * spilled to L3 and ran at 41% of the matrix-product rate on an Intel Xeon. The forward carries its
 * softmax from group to group (the running maximum rescales the output, as in FlashAttention); the
 * backward needs no carry. */
#ifndef CH
#define CH (65536 / TQ)
#endif

typedef struct {
    TileScratch ts;
    int *full;
    int32_t *Mt;
    float *St, *dPt;
    int *pc, *gp; /* a tile's pieces [5] each, and where each group of pieces starts */
} TileBuf;

static TileBuf *tilebuf_new(const Desc *d)
{
    size_t w = (size_t)imax(d->maxw, 1);
    int maxiv = 1;
    for (int t = 0; t < d->ntiles; t++) maxiv = imax(maxiv, d->ptr[t + 1] - d->ptr[t]);
    size_t np = (size_t)maxiv + w / CH + 2; /* at most one cut per CH keys */
    TileBuf *b = calloc(1, sizeof(TileBuf));
    if (!b) return NULL;
    b->full = malloc(sizeof(int) * w);
    b->Mt = malloc(sizeof(int32_t) * w * TQ);
    b->St = malloc(sizeof(float) * w * TQ);
    b->dPt = malloc(sizeof(float) * w * TQ);
    b->pc = malloc(sizeof(int) * 5 * np);
    b->gp = malloc(sizeof(int) * (np + 1));
    if (!b->full || !b->Mt || !b->St || !b->dPt || !b->pc || !b->gp) {
        free(b->full); free(b->Mt); free(b->St); free(b->dPt); free(b->pc); free(b->gp); free(b);
        return NULL;
    }
    return b;
}

static void tilebuf_free(TileBuf *b)
{
    if (b) { free(b->full); free(b->Mt); free(b->St); free(b->dPt); free(b->pc); free(b->gp); free(b); }
}

/* The intervals of tile t cut into pieces of at most CH keys (a MASK interval stays whole: its mask rows
 * are its length apart), then grouped in order: group g is pieces gp[g]..gp[g+1]-1, at most CH keys
 * unless it is one long MASK interval. Returns the number of groups. */
static int tile_groups(const Desc *d, int t, TileBuf *b)
{
    int n = 0, ng = 0, W = 0;
    b->gp[0] = 0;
    for (int x = d->ptr[t]; x < d->ptr[t + 1]; x++) {
        const int *e = d->iv + 5 * (size_t)x;
        for (int s0 = e[1], len; s0 < e[2]; s0 += len) {
            len = e[3] == IV_MASK ? e[2] - s0 : imin(CH, e[2] - s0);
            if (W > 0 && W + len > CH) { b->gp[++ng] = n; W = 0; }
            int *p = b->pc + 5 * (size_t)n++;
            p[0] = e[0]; p[1] = s0; p[2] = s0 + len; p[3] = e[3]; p[4] = e[4];
            W += len;
        }
    }
    if (W > 0) b->gp[++ng] = n;
    return ng;
}

/* The rows of interval e: keys, values and (backward) their gradient rows. */
static void segment(const Seq *s, const int *e, const float **K, const float **V, float **dK, float **dV)
{
    size_t off = (size_t)e[1] * HD;
    *K = (e[0] ? s->Gk : s->k) + off;
    *V = (e[0] ? s->Gv : s->v) + off;
    if (dK) {
        if (e[0]) { *dK = s->dGk + off; *dV = s->dGv + off; }
        else { *dK = s->dk + off - s->kbase * HD; *dV = s->dv + off - s->kbase * HD; }
    }
}

/* The band of piece e for the tile at query r0: query a attends its keys [a + *qlo, a + *qhi]
 * (unbounded unless e is a BAND interval of the sequence itself). */
static void piece_band(const int *e, int r0, int *qlo, int *qhi)
{
    *qlo = -UNBOUNDED;
    *qhi = UNBOUNDED;
    if (e[0] == 0 && e[3] == IV_BAND) { /* kpos = e[1] + j <= qpos = r0 + a, and qpos - kpos < w */
        *qhi = r0 - e[1];
        if (e[4] > 0) *qlo = r0 - e[1] - e[4] + 1;
    }
}

/* Out^T = X Y^T for the rows X of the pieces pc[0..np) (the keys, or the values with ``values``),
 * one piece after another: Out has a row per key, TQ columns. */
static void products(const Seq *s, const int *pc, int np, int r0, int values, const float *Yt,
                     float *Out)
{
    int j = 0;
    for (int x = 0; x < np; x++) {
        const int *e = pc + 5 * (size_t)x;
        const float *K, *V;
        int qlo, qhi;
        segment(s, e, &K, &V, NULL, NULL);
        piece_band(e, r0, &qlo, &qhi);
        gemm_nn(e[2] - e[1], TQ, HD, values ? V : K, HD, Yt, TQ, Out + (size_t)j * TQ, TQ, 0, k_rows(RNG_N, qlo, qhi));
        j += e[2] - e[1];
    }
}

static void tiles_fwd_one(const Desc *d, const Seq *s, int t, TileBuf *b)
{
    int r0 = t * TQ, rows = imin(TQ, d->N - r0), rq = r0 - d->q0; /* rq: the tile's first row of q, o, lse */
    TileScratch *ts = &b->ts;
    float *Or = s->o + (size_t)rq * HD;
    int ng = tile_groups(d, t, b);
    if (ng == 0) {
        memset(Or, 0, sizeof(float) * rows * HD);
        for (int a = 0; a < rows; a++) s->lse_out[rq + a] = -INFINITY;
        return;
    }
    float m[TQ], sum[TQ];
    for (int a = 0; a < TQ; a++) { m[a] = -INFINITY; sum[a] = 0.f; }
    transpose_tile(s->q + (size_t)rq * HD, rows, ts->Qt, d->scale * LOG2E);
    for (int g = 0; g < ng; g++) {
        const int *pc = b->pc + 5 * (size_t)b->gp[g];
        int np = b->gp[g + 1] - b->gp[g];
        int W = tile_masks(d, pc, np, r0, rows, b->full, b->Mt);
        products(s, pc, np, r0, 0, ts->Qt, b->St);  /* S^T = K Q^T */
        softmax_group(b->St, W, b->full, b->Mt, m, sum, ts->inv);
        if (g > 0) scale_rows(Or, rows, ts->inv);
        for (int x = 0, j = 0; x < np; x++) {
            const int *e = pc + 5 * (size_t)x;
            const float *K, *V;
            int qlo, qhi;
            segment(s, e, &K, &V, NULL, NULL);
            piece_band(e, r0, &qlo, &qhi);
            gemm_tn(rows, HD, e[2] - e[1], b->St + (size_t)j * TQ, TQ, V, HD, Or, HD, g > 0 || j > 0,
                    q_rows(qlo, qhi));  /* O += P V */
            j += e[2] - e[1];
        }
    }
    for (int v = 0; v < TQ / VL; v++) finish_rows(ld(m + v * VL), ld(sum + v * VL), ts->lse + v * VL, ts->inv + v * VL);
    scale_rows(Or, rows, ts->inv);
    memcpy(s->lse_out + rq, ts->lse, sizeof(float) * rows);
}

static void tiles_bwd_one(const Desc *d, const Seq *s, int t, TileBuf *b)
{
    int r0 = t * TQ, rows = imin(TQ, d->N - r0), rq = r0 - d->q0;
    TileScratch *ts = &b->ts;
    int ng = tile_groups(d, t, b);
    if (ng == 0) return;
    for (int a = 0; a < TQ; a++) {
        ts->lse[a] = a < rows ? s->lse[rq + a] : 0.f;
        ts->delta[a] = a < rows ? s->delta[rq + a] : 0.f;
    }
    const float *Qr = s->q + (size_t)rq * HD, *dOr = s->dout + (size_t)rq * HD;
    float *dQr = s->dq + (size_t)rq * HD;
    transpose_tile(Qr, rows, ts->Qt, d->scale * LOG2E);
    transpose_tile(dOr, rows, ts->dOt, 1.0f);
    for (int g = 0; g < ng; g++) { /* each group on its own: the log-sum-exps are known */
        const int *pc = b->pc + 5 * (size_t)b->gp[g];
        int np = b->gp[g + 1] - b->gp[g];
        int W = tile_masks(d, pc, np, r0, rows, b->full, b->Mt);
        products(s, pc, np, r0, 0, ts->Qt, b->St);   /* S^T  = K Q^T  */
        products(s, pc, np, r0, 1, ts->dOt, b->dPt); /* dP^T = V dO^T */
        grad_masked(b->St, b->dPt, W, b->full, b->Mt, d->scale, ts->lse, ts->delta);
        for (int x = 0, j = 0; x < np; x++) {
            const int *e = pc + 5 * (size_t)x;
            const float *K, *V;
            float *dK, *dV;
            int len = e[2] - e[1], qlo, qhi;
            segment(s, e, &K, &V, &dK, &dV);
            piece_band(e, r0, &qlo, &qhi);
            Rng q = q_rows(qlo, qhi), k = k_rows(RNG_K, qlo, qhi);
            gemm_tn(rows, HD, len, b->dPt + (size_t)j * TQ, TQ, K, HD, dQr, HD, 1, q);  /* dQ += dS K    */
            gemm_nk(len, HD, rows, b->St + (size_t)j * TQ, TQ, dOr, HD, dV, HD, 1, k);  /* dV += P^T dO  */
            gemm_nk(len, HD, rows, b->dPt + (size_t)j * TQ, TQ, Qr, HD, dK, HD, 1, k);  /* dK += dS^T Q  */
            j += len;
        }
    }
}

static void gather_rows(const float *X, const int *pos, int n, float *dst)
{
    for (int g = 0; g < n; g++) memcpy(dst + (size_t)g * HD, X + (size_t)pos[g] * HD, sizeof(float) * HD);
}

static void scatter_add_rows(float *X, const int *pos, int n, const float *src)
{
    for (int g = 0; g < n; g++)
        for (int c = 0; c < HD; c += VL) st(X + (size_t)pos[g] * HD + c, ld(X + (size_t)pos[g] * HD + c) + ld(src + (size_t)g * HD + c));
}

/* Forward over all sequences: the views of each sequence are gathered once, then
 * the tiles run in parallel (they only read). */
static int tiles_forward(const Desc *d, int BH, int nthreads, const float *q, const float *k, const float *v,
                         float *o, float *lse)
{
    size_t NH = (size_t)d->N * HD;
    float *G = d->ng ? malloc(sizeof(float) * (size_t)BH * d->ng * HD * 2) : NULL;
    int failed = d->ng && !G;
    if (!failed && d->ng) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (long b = 0; b < BH; b++) {
            gather_rows(k + b * NH, d->gpos, d->ng, G + (size_t)b * d->ng * HD * 2);
            gather_rows(v + b * NH, d->gpos, d->ng, G + ((size_t)b * 2 + 1) * d->ng * HD);
        }
    }
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        TileBuf *buf = failed ? NULL : tilebuf_new(d);
        if (!buf) failed = 1;
        int t0 = d->q0 / TQ, nt = d->ntiles - t0, NQ = d->N - d->q0; /* the tiles of the queries */
#pragma omp for schedule(dynamic, 4)
        for (long it = 0; it < (long)BH * nt; it++) {
            if (!buf) continue;
            long b = it / nt;
            float *gb = G ? G + (size_t)b * d->ng * HD * 2 : NULL;
            Seq s = {q + b * NQ * HD, k + b * NH, v + b * NH, NULL, NULL, NULL, gb, gb ? gb + (size_t)d->ng * HD : NULL,
                     o + b * NQ * HD, lse + b * NQ, NULL, NULL, NULL, NULL, NULL, 0};
            tiles_fwd_one(d, &s, t0 + (int)(it % nt), buf);
        }
        tilebuf_free(buf);
    }
    free(G);
    return failed;
}

/* Backward of all tiles of one sequence: gradients go to the rows of s. */
static void tiles_bwd_seq(const Desc *d, const Seq *s, TileBuf *buf)
{
    for (int t = d->q0 / TQ; t < d->ntiles; t++) tiles_bwd_one(d, s, t, buf);
}

/* A tile's work, for splitting: its keys, plus TQ for what every tile costs. */
static double tile_work(const Desc *d, int t)
{
    double w = TQ;
    for (int x = d->ptr[t]; x < d->ptr[t + 1]; x++) w += d->iv[5 * (size_t)x + 2] - d->iv[5 * (size_t)x + 1];
    return w;
}

/* The tiles t0..t1-1 split into n runs of about equal work: run r is tiles cut[r]..cut[r+1]-1. */
static void split_tiles(const Desc *d, int t0, int t1, int n, int *cut)
{
    double total = 0, acc = 0;
    for (int t = t0; t < t1; t++) total += tile_work(d, t);
    cut[0] = t0;
    int r = 1;
    for (int t = t0; t < t1 && r < n; t++) {
        acc += tile_work(d, t);
        while (r < n && acc >= total * r / n) cut[r++] = t + 1;
    }
    while (r <= n) cut[r++] = t1;
}

/* The key rows (of the sequence itself, view 0) that tiles t0..t1-1 read: [*lo, *hi). */
static void key_range(const Desc *d, int t0, int t1, int *lo, int *hi)
{
    *lo = d->N;
    *hi = 0;
    for (int t = t0; t < t1; t++)
        for (int x = d->ptr[t]; x < d->ptr[t + 1]; x++) {
            const int *e = d->iv + 5 * (size_t)x;
            if (e[0] == 0 && e[2] > e[1]) { *lo = imin(*lo, e[1]); *hi = imax(*hi, e[2]); }
        }
    if (*hi <= *lo) *lo = *hi = 0;
}

/* Backward of one sequence shared by the threads: each takes a run of tiles of about equal work.
 * Thread 0 adds into dK, dV themselves; the others into private rows for the keys their tiles
 * read (a band pattern's window past their run), added after all are done. (A private copy of
 * all of dK and dV per thread took 1 GB at a million positions.) Gathered views: each thread's
 * own dGk, dGv, scattered into dK, dV at the end. */
static int tiles_backward_shared(const Desc *d, int nthreads, const Seq *all, float *dk, float *dv)
{
    size_t GH = (size_t)d->ng * HD;
    int failed = 0, cut[257];
#pragma omp parallel num_threads(imin(nthreads, 256)) reduction(| : failed)
    {
#pragma omp single
        split_tiles(d, d->q0 / TQ, d->ntiles, omp_get_num_threads(), cut); /* the team as it came */
        int me = omp_get_thread_num(), lo = 0, hi = 0;
        if (me > 0) key_range(d, cut[me], cut[me + 1], &lo, &hi);
        size_t rows = (size_t)(hi - lo);
        TileBuf *buf = tilebuf_new(d);
        float *P = calloc(2 * rows * HD + 2 * GH + 16, sizeof(float)); /* private dK, dV rows lo..hi-1, dGk, dGv */
        if (!buf || !P) failed = 1;
        Seq s = *all;
        if (me > 0) { s.dk = P; s.dv = P + rows * HD; s.kbase = (size_t)lo; }
        s.dGk = P + 2 * rows * HD;
        s.dGv = s.dGk + GH;
        if (buf && P)
            for (int t = cut[me]; t < cut[me + 1]; t++) tiles_bwd_one(d, &s, t, buf);
#pragma omp barrier
        if (buf && P) {
#pragma omp critical
            {
                if (me > 0)
                    for (size_t i = 0; i < rows * HD; i++) {
                        dk[(size_t)lo * HD + i] += s.dk[i];
                        dv[(size_t)lo * HD + i] += s.dv[i];
                    }
                scatter_add_rows(dk, d->gpos, d->ng, s.dGk);
                scatter_add_rows(dv, d->gpos, d->ng, s.dGv);
            }
        }
        free(P);
        tilebuf_free(buf);
    }
    return failed;
}

/* Backward. The tiles of one sequence add into the same key rows, so either each thread owns
 * whole sequences (BH >= threads), or the threads share one sequence (tiles_backward_shared).
 * Gathered views: their gradients are added to their rows. */
static int tiles_backward(const Desc *d, int BH, int nthreads, const float *q, const float *k, const float *v,
                          const float *dout, const float *lse, const float *delta, float *dq, float *dk, float *dv)
{
    size_t NH = (size_t)d->N * HD, GH = (size_t)d->ng * HD, NQ = (size_t)(d->N - d->q0);
    int failed = 0;
    if (BH >= nthreads) {
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
        {
            TileBuf *buf = tilebuf_new(d);
            float *G = malloc(sizeof(float) * (4 * GH + 16));
            if (!buf || !G) failed = 1;
#pragma omp for schedule(dynamic, 1)
            for (long b = 0; b < BH; b++) {
                if (!buf || !G) continue;
                Seq s = {q + b * NQ * HD, k + b * NH, v + b * NH, dout + b * NQ * HD, lse + b * NQ, delta + b * NQ,
                         G, G + GH, NULL, NULL, dq + b * NQ * HD, dk + b * NH, dv + b * NH, G + 2 * GH, G + 3 * GH, 0};
                gather_rows(s.k, d->gpos, d->ng, G);
                gather_rows(s.v, d->gpos, d->ng, G + GH);
                memset(G + 2 * GH, 0, sizeof(float) * 2 * GH);
                tiles_bwd_seq(d, &s, buf);
                scatter_add_rows(s.dk, d->gpos, d->ng, s.dGk);
                scatter_add_rows(s.dv, d->gpos, d->ng, s.dGv);
            }
            free(G);
            tilebuf_free(buf);
        }
        return failed;
    }
    float *G = malloc(sizeof(float) * (2 * GH + 16));
    if (!G) return 1;
    for (long b = 0; b < BH && !failed; b++) {
        gather_rows(k + b * NH, d->gpos, d->ng, G);
        gather_rows(v + b * NH, d->gpos, d->ng, G + GH);
        Seq s = {q + b * NQ * HD, k + b * NH, v + b * NH, dout + b * NQ * HD, lse + b * NQ, delta + b * NQ,
                 G, G + GH, NULL, NULL, dq + b * NQ * HD, dk + b * NH, dv + b * NH, NULL, NULL, 0};
        failed |= tiles_backward_shared(d, nthreads, &s, dk + b * NH, dv + b * NH);
    }
    free(G);
    return failed;
}

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
