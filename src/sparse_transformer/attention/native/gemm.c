/* The GEMM micro-kernels and the tile transposes of the fused CPU kernel.
 * Included by kernel.c (its vector types, ISA constants and helpers); not compiled on its own. */

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

/* dst[c][r] = mul * src[r][c] for r < R, c < HD (dst has TQ columns; columns R..lanes-1 are zeroed).
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

static void transpose_tile(const float *src, int R, int lanes, float *dst, float mul)
{
    int r0 = 0;
#ifdef IDX
    for (; r0 + VL <= R; r0 += VL)
        for (int c = 0; c < HD; c += VL) transpose_block(src + (size_t)r0 * HD + c, dst + (size_t)c * TQ + r0, mul);
#endif
    for (int c = 0; c < HD; c++) {
        for (int r = r0; r < R; r++) dst[c * TQ + r] = mul * src[(size_t)r * HD + c];
        for (int r = imax(R, r0); r < lanes; r++) dst[c * TQ + r] = 0.f;
    }
}
