/* Fused strided / local attention for the CPU, float32 (paper section 5.5).
 *
 * The strided pattern is computed in two passes over the sequence, as the
 * paper describes its kernels:
 *   local pass    query i attends keys i-w < j <= i, in tiles of TQ queries
 *                 that read one contiguous window of w + TQ - 1 keys;
 *   column pass   view the sequence as [N/l, l] and transpose it: column c
 *                 holds positions c, c+l, c+2l, ...; a query attends the
 *                 earlier positions of its column (strictly earlier when the
 *                 local pass already has the diagonal).
 * Each pass computes an exact softmax over all of its keys at once (a query
 * has at most w or N/l of them), and the column pass merges its result into
 * the local one through the log-sum-exps. Nothing of size N x N exists and no
 * tile above the diagonal is ever computed.
 *
 * Layout: q, k, v, o, do, dq, dk, dv are [BH][N][HD] contiguous float32;
 * lse is [BH][N]. N is a multiple of l for the column pass. HD (the head
 * width) is fixed at compile time (-DHD=64); it must be a multiple of 16.
 * Plain C with GCC/Clang vector extensions, OpenMP for the threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef HD
#error "compile with -DHD=<head width, a multiple of 16>"
#endif
#if HD % 16 != 0
#error "HD must be a multiple of 16"
#endif

#define VL 16   /* floats per vector */
#define TQ 32   /* queries per tile */
#define MR 4    /* rows per micro-kernel block */

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

static inline vf ld(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf splat(float x) { vf v = {0}; return v + x; }
static inline int imin(int a, int b) { return a < b ? a : b; }
static inline int imax(int a, int b) { return a > b ? a : b; }
static inline int up16(int x) { return (x + 15) & ~15; }

/* Left alone, GCC folds the loads of B into every FMA that uses them (MR
 * loads of each vector instead of one), and the micro-kernel becomes bound by
 * loads: this empty asm pins the vector in a register (2x faster, AVX-512). */
#if defined(__AVX512F__) && (defined(__GNUC__) || defined(__clang__))
#define KEEP_IN_REGISTER(x) __asm__("" : "+v"(x))
#else
#define KEEP_IN_REGISTER(x) ((void)0)
#endif

/* ------------------------------------------------------------------ GEMM
 * C[M][N] (+)= A[M][K] B[K][N], N a multiple of 16, row-major with leading
 * dimensions. A register block of MR rows x up to 4 vectors. */
static inline __attribute__((always_inline)) void
micro(int mb, int nvb, int K, const float *A, int lda, const float *B, int ldb, float *C, int ldc, int acc)
{
    vf c[MR][4];
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < 4; v++) c[r][v] = splat(0.f);
    for (int k = 0; k < K; k++) {
        vf b[4];
        for (int v = 0; v < 4; v++)
            if (v < nvb) { b[v] = ld(B + (size_t)k * ldb + v * VL); KEEP_IN_REGISTER(b[v]); }
        for (int r = 0; r < MR; r++) {
            if (r >= mb) break;
            float a = A[(size_t)r * lda + k];
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

#define MICRO_CASE(mb, nvb) \
    case (mb) * 8 + (nvb): micro(mb, nvb, K, a, lda, b, ldb, c, ldc, acc); break;

static void gemm(int M, int N, int K, const float *A, int lda, const float *B, int ldb, float *C, int ldc, int acc)
{
    for (int i = 0; i < M; i += MR) {
        int mb = imin(MR, M - i);
        for (int j = 0; j < N; j += 4 * VL) {
            int nvb = imin(4, (N - j) / VL);
            const float *a = A + (size_t)i * lda, *b = B + j;
            float *c = C + (size_t)i * ldc + j;
            switch (mb * 8 + nvb) {
                MICRO_CASE(4, 4) MICRO_CASE(4, 3) MICRO_CASE(4, 2) MICRO_CASE(4, 1)
                MICRO_CASE(3, 4) MICRO_CASE(3, 3) MICRO_CASE(3, 2) MICRO_CASE(3, 1)
                MICRO_CASE(2, 4) MICRO_CASE(2, 3) MICRO_CASE(2, 2) MICRO_CASE(2, 1)
                MICRO_CASE(1, 4) MICRO_CASE(1, 3) MICRO_CASE(1, 2) MICRO_CASE(1, 1)
            }
        }
    }
}

/* dst[c][r] = src[r][c] for r < R, c < C; columns c in [C, Cp) of dst are zeroed. */
static void transpose(const float *src, int lds, int R, int C, float *dst, int ldd, int Rp)
{
    for (int c = 0; c < C; c++)
        for (int r = 0; r < R; r++) dst[(size_t)c * ldd + r] = src[(size_t)r * lds + c];
    for (int c = 0; c < C; c++)
        for (int r = R; r < Rp; r++) dst[(size_t)c * ldd + r] = 0.f;
}

/* --------------------------------------------------------------- softmax */
static inline vf vsel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
static inline vf vmax(vf a, vf b) { return vsel(a > b, a, b); }

static inline vf vexp(vf x)
{
    /* e^x = 2^n e^r with n = round(x / ln 2), |r| <= ln(2)/2; degree-6 Taylor
     * polynomial, relative error below 2e-7. x is clamped to [-87, 88]. */
    x = vmax(x, splat(-87.0f));
    x = vsel(x > splat(88.0f), splat(88.0f), x);
    const vf magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    vf n = (x * 1.44269504088896341f + magic) - magic;
    vf r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
    vf p = splat(1.0f / 720);
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return p * (vf)e;
}

static inline float hmax(vf v) { float m = v[0]; for (int i = 1; i < VL; i++) m = v[i] > m ? v[i] : m; return m; }
static inline float hsum(vf v) { float s = 0; for (int i = 0; i < VL; i++) s += v[i]; return s; }

static const vi IOTA = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

/* Row s[0..Wp) of raw scores; keys lo..hi (inclusive) are allowed. Leaves the
 * normalised probabilities in s (0 outside [lo, hi]) and returns the
 * log-sum-exp of the scaled scores (-inf if there is no key). */
static float softmax_row(float *s, int Wp, int lo, int hi, float scale)
{
    if (hi < lo) { memset(s, 0, sizeof(float) * Wp); return -INFINITY; }
    vf m = splat(-INFINITY);
    for (int t = 0; t < Wp; t += VL) {
        vi idx = IOTA + t;
        vi ok = (idx >= lo) & (idx <= hi);
        m = vmax(m, vsel(ok, ld(s + t) * scale, splat(-INFINITY)));
    }
    float mx = hmax(m);
    vf sum = splat(0.f);
    for (int t = 0; t < Wp; t += VL) {
        vi idx = IOTA + t;
        vi ok = (idx >= lo) & (idx <= hi);
        vf p = (vf)((vi)vexp(ld(s + t) * scale - mx) & ok);
        sum += p;
        st(s + t, p);
    }
    float tot = hsum(sum), inv = 1.0f / tot;
    for (int t = 0; t < Wp; t += VL) st(s + t, ld(s + t) * inv);
    return mx + logf(tot);
}

/* Backward of one row: p = exp(s*scale - lse) on [lo, hi], 0 elsewhere, kept in s;
 * ds = p * (dp - delta) * scale, kept in dp. */
static void grad_row(float *s, float *dp, int Wp, int lo, int hi, float scale, float lse, float delta)
{
    if (hi < lo || !isfinite(lse)) {
        memset(s, 0, sizeof(float) * Wp);
        memset(dp, 0, sizeof(float) * Wp);
        return;
    }
    for (int t = 0; t < Wp; t += VL) {
        vi idx = IOTA + t;
        vi ok = (idx >= lo) & (idx <= hi);
        vf p = (vf)((vi)vexp(ld(s + t) * scale - lse) & ok);
        st(s + t, p);
        st(dp + t, p * (ld(dp + t) - delta) * scale);
    }
}

/* ------------------------------------------------------------ tile work */
typedef struct {
    int N, w, l, strict;
    float scale;
} Shape;

/* Local pass, forward, queries r0..r0+TQ-1 of one sequence. */
static void local_fwd(const Shape *sh, const float *Q, const float *K, const float *V, float *O, float *L, int r0, float *buf)
{
    int N = sh->N, w = sh->w;
    int r1 = imin(r0 + TQ, N), rows = r1 - r0;
    int j0 = imax(0, r0 - w + 1), W = r1 - j0, Wp = up16(W);
    float *Kt = buf, *S = Kt + (size_t)HD * Wp;
    transpose(K + (size_t)j0 * HD, HD, W, HD, Kt, Wp, Wp);
    gemm(rows, Wp, HD, Q + (size_t)r0 * HD, HD, Kt, Wp, S, Wp, 0);
    for (int a = 0; a < rows; a++) {
        int i = r0 + a;
        L[i] = softmax_row(S + (size_t)a * Wp, Wp, imax(0, i - w + 1) - j0, i - j0, sh->scale);
    }
    gemm(rows, HD, W, S, Wp, V + (size_t)j0 * HD, HD, O + (size_t)r0 * HD, HD, 0);
}

/* Local pass, backward, queries r0..: adds into dQ rows and dK, dV of the window. */
static void local_bwd(const Shape *sh, const float *Q, const float *K, const float *V, const float *dO,
                      const float *L, const float *Dl, float *dQ, float *dK, float *dV, int r0, float *buf)
{
    int N = sh->N, w = sh->w;
    int r1 = imin(r0 + TQ, N), rows = r1 - r0;
    int j0 = imax(0, r0 - w + 1), W = r1 - j0, Wp = up16(W);
    float *Kt = buf, *Vt = Kt + (size_t)HD * Wp, *S = Vt + (size_t)HD * Wp, *dP = S + (size_t)TQ * Wp;
    float *Pt = dP + (size_t)TQ * Wp, *dSt = Pt + (size_t)Wp * TQ;
    transpose(K + (size_t)j0 * HD, HD, W, HD, Kt, Wp, Wp);
    transpose(V + (size_t)j0 * HD, HD, W, HD, Vt, Wp, Wp);
    gemm(rows, Wp, HD, Q + (size_t)r0 * HD, HD, Kt, Wp, S, Wp, 0);
    gemm(rows, Wp, HD, dO + (size_t)r0 * HD, HD, Vt, Wp, dP, Wp, 0);
    for (int a = 0; a < rows; a++) {
        int i = r0 + a;
        grad_row(S + (size_t)a * Wp, dP + (size_t)a * Wp, Wp, imax(0, i - w + 1) - j0, i - j0, sh->scale, L[i], Dl[i]);
    }
    gemm(rows, HD, W, dP, Wp, K + (size_t)j0 * HD, HD, dQ + (size_t)r0 * HD, HD, 1);
    transpose(S, Wp, rows, W, Pt, TQ, rows);
    transpose(dP, Wp, rows, W, dSt, TQ, rows);
    gemm(W, HD, rows, Pt, TQ, dO + (size_t)r0 * HD, HD, dV + (size_t)j0 * HD, HD, 1);
    gemm(W, HD, rows, dSt, TQ, Q + (size_t)r0 * HD, HD, dK + (size_t)j0 * HD, HD, 1);
}

static size_t local_buf_floats(int w)
{
    size_t Wp = up16(w + TQ);
    return 2 * HD * Wp + 4 * TQ * Wp + 64;
}

/* Column pass scratch: gathered rows of one column (M = N / l of them). */
static size_t col_buf_floats(int M)
{
    size_t Mp = up16(M);
    return 8 * (size_t)M * HD + 2 * HD * Mp + 4 * TQ * Mp + 2 * Mp + 64;
}

static void gather(const float *X, int M, int l, int c, float *dst)
{
    for (int m = 0; m < M; m++) memcpy(dst + (size_t)m * HD, X + ((size_t)m * l + c) * HD, sizeof(float) * HD);
}

static inline int col_lo(const Shape *sh) { (void)sh; return 0; }
static inline int col_hi(const Shape *sh, int m) { return sh->strict ? m - 1 : m; }

/* Column pass, forward, column c of one sequence; merges into O, L when ``merge``. */
static void col_fwd(const Shape *sh, const float *Q, const float *K, const float *V, float *O, float *L, int c, int merge, float *buf)
{
    int l = sh->l, M = sh->N / l, Mp = up16(M);
    float *Qc = buf, *Vc = Qc + (size_t)M * HD, *Kct = Vc + (size_t)M * HD, *S = Kct + (size_t)HD * Mp;
    float *Ot = S + (size_t)TQ * Mp;
    gather(Q, M, l, c, Qc);
    gather(V, M, l, c, Vc);
    for (int d = 0; d < HD; d++) {
        for (int m = 0; m < M; m++) Kct[(size_t)d * Mp + m] = K[((size_t)m * l + c) * HD + d];
        for (int m = M; m < Mp; m++) Kct[(size_t)d * Mp + m] = 0.f;
    }
    for (int m0 = 0; m0 < M; m0 += TQ) {
        int m1 = imin(m0 + TQ, M), rows = m1 - m0;
        int W = col_hi(sh, m1 - 1) + 1;
        if (W <= 0) W = 0;
        int Wp = up16(W);
        if (W > 0) {
            gemm(rows, Wp, HD, Qc + (size_t)m0 * HD, HD, Kct, Mp, S, Wp, 0);
        }
        float lse[TQ];
        for (int a = 0; a < rows; a++)
            lse[a] = W > 0 ? softmax_row(S + (size_t)a * Wp, Wp, col_lo(sh), col_hi(sh, m0 + a), sh->scale) : -INFINITY;
        if (W > 0) gemm(rows, HD, W, S, Wp, Vc, HD, Ot, HD, 0);
        for (int a = 0; a < rows; a++) {
            size_t i = (size_t)(m0 + a) * l + c;
            float *o = O + i * HD, *oc = Ot + (size_t)a * HD;
            if (!merge) {
                if (isinf(lse[a])) memset(o, 0, sizeof(float) * HD);
                else memcpy(o, oc, sizeof(float) * HD);
                L[i] = lse[a];
            } else if (!isinf(lse[a])) {
                float l1 = L[i], l2 = lse[a];
                float mx = l1 > l2 ? l1 : l2;
                float e1 = expf(l1 - mx), e2 = expf(l2 - mx), tot = e1 + e2;
                float w1 = e1 / tot, w2 = e2 / tot;
                for (int d = 0; d < HD; d++) o[d] = o[d] * w1 + oc[d] * w2;
                L[i] = mx + logf(tot);
            }
        }
    }
}

static void col_bwd(const Shape *sh, const float *Q, const float *K, const float *V, const float *dO,
                    const float *L, const float *Dl, float *dQ, float *dK, float *dV, int c, float *buf)
{
    int l = sh->l, M = sh->N / l, Mp = up16(M);
    float *Qc = buf, *Kc = Qc + (size_t)M * HD, *Vc = Kc + (size_t)M * HD, *dOc = Vc + (size_t)M * HD;
    float *dQc = dOc + (size_t)M * HD, *dKc = dQc + (size_t)M * HD, *dVc = dKc + (size_t)M * HD;
    float *Kct = dVc + (size_t)M * HD + (size_t)M * HD, *Vct = Kct + (size_t)HD * Mp;
    float *S = Vct + (size_t)HD * Mp, *dP = S + (size_t)TQ * Mp, *Pt = dP + (size_t)TQ * Mp, *dSt = Pt + (size_t)Mp * TQ;
    float *Lc = dSt + (size_t)Mp * TQ, *Dc = Lc + Mp;
    gather(Q, M, l, c, Qc);
    gather(K, M, l, c, Kc);
    gather(V, M, l, c, Vc);
    gather(dO, M, l, c, dOc);
    for (int m = 0; m < M; m++) { Lc[m] = L[(size_t)m * l + c]; Dc[m] = Dl[(size_t)m * l + c]; }
    transpose(Kc, HD, M, HD, Kct, Mp, Mp);
    transpose(Vc, HD, M, HD, Vct, Mp, Mp);
    memset(dQc, 0, sizeof(float) * 3 * (size_t)M * HD);
    for (int m0 = 0; m0 < M; m0 += TQ) {
        int m1 = imin(m0 + TQ, M), rows = m1 - m0;
        int W = col_hi(sh, m1 - 1) + 1;
        if (W <= 0) continue;
        int Wp = up16(W);
        gemm(rows, Wp, HD, Qc + (size_t)m0 * HD, HD, Kct, Mp, S, Wp, 0);
        gemm(rows, Wp, HD, dOc + (size_t)m0 * HD, HD, Vct, Mp, dP, Wp, 0);
        for (int a = 0; a < rows; a++)
            grad_row(S + (size_t)a * Wp, dP + (size_t)a * Wp, Wp, col_lo(sh), col_hi(sh, m0 + a), sh->scale, Lc[m0 + a], Dc[m0 + a]);
        gemm(rows, HD, W, dP, Wp, Kc, HD, dQc + (size_t)m0 * HD, HD, 1);
        transpose(S, Wp, rows, W, Pt, TQ, rows);
        transpose(dP, Wp, rows, W, dSt, TQ, rows);
        gemm(W, HD, rows, Pt, TQ, dOc + (size_t)m0 * HD, HD, dVc, HD, 1);
        gemm(W, HD, rows, dSt, TQ, Qc + (size_t)m0 * HD, HD, dKc, HD, 1);
    }
    for (int m = 0; m < M; m++) {
        size_t i = ((size_t)m * l + c) * HD;
        for (int d = 0; d < HD; d++) {
            dQ[i + d] += dQc[(size_t)m * HD + d];
            dK[i + d] += dKc[(size_t)m * HD + d];
            dV[i + d] += dVc[(size_t)m * HD + d];
        }
    }
}

/* ------------------------------------------------------------ entry points
 * w: local window (0: no local pass); l: column stride (0: no column pass);
 * strict: the column pass leaves out the query's own position.
 * Returns 0, or -1 if scratch memory could not be allocated. */
int st_forward(int BH, int N, int w, int l, int strict, float scale, int nthreads,
               const float *q, const float *k, const float *v, float *o, float *lse)
{
    Shape sh = {N, w, l, strict, scale};
    int failed = 0;
    size_t NH = (size_t)N * HD;
    if (w > 0) {
        int tiles = (N + TQ - 1) / TQ;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
        {
            float *buf = malloc(sizeof(float) * local_buf_floats(w));
            if (!buf) failed = 1;
#pragma omp for schedule(dynamic, 4)
            for (long it = 0; it < (long)BH * tiles; it++) {
                if (!buf) continue;
                long b = it / tiles;
                local_fwd(&sh, q + b * NH, k + b * NH, v + b * NH, o + b * NH, lse + b * N, (int)(it % tiles) * TQ, buf);
            }
            free(buf);
        }
    }
    if (l > 0 && !failed) {
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
        {
            float *buf = malloc(sizeof(float) * col_buf_floats(N / l));
            if (!buf) failed = 1;
#pragma omp for schedule(dynamic, 1)
            for (long it = 0; it < (long)BH * l; it++) {
                if (!buf) continue;
                long b = it / l;
                col_fwd(&sh, q + b * NH, k + b * NH, v + b * NH, o + b * NH, lse + b * N, (int)(it % l), w > 0, buf);
            }
            free(buf);
        }
    }
    return failed ? -1 : 0;
}

int st_backward(int BH, int N, int w, int l, int strict, float scale, int nthreads,
                const float *q, const float *k, const float *v, const float *o, const float *dout,
                const float *lse, float *dq, float *dk, float *dv)
{
    Shape sh = {N, w, l, strict, scale};
    int failed = 0;
    size_t NH = (size_t)N * HD;
    float *delta = malloc(sizeof(float) * (size_t)BH * N);
    if (!delta) return -1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long i = 0; i < (long)BH * N; i++) {
        const float *a = o + i * HD, *b = dout + i * HD;
        float s = 0;
        for (int d = 0; d < HD; d++) s += a[d] * b[d];
        delta[i] = s;
    }
    if (w > 0) {
        /* Chunks of at least w queries: a chunk's keys reach back into the previous
         * chunk only, so the even chunks, then the odd ones, run without races. */
        int tiles = (N + TQ - 1) / TQ;
        int per = imax((w + TQ - 1) / TQ, 16);
        int chunks = (tiles + per - 1) / per;
        for (int phase = 0; phase < 2 && !failed; phase++) {
            int half = (chunks + 1 - phase) / 2;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
            {
                float *buf = malloc(sizeof(float) * local_buf_floats(w));
                if (!buf) failed = 1;
#pragma omp for schedule(dynamic, 1)
                for (long it = 0; it < (long)BH * half; it++) {
                    if (!buf) continue;
                    long b = it / half;
                    int ch = 2 * (int)(it % half) + phase;
                    int t1 = imin(tiles, (ch + 1) * per);
                    for (int t = ch * per; t < t1; t++)
                        local_bwd(&sh, q + b * NH, k + b * NH, v + b * NH, dout + b * NH, lse + b * N, delta + b * N,
                                  dq + b * NH, dk + b * NH, dv + b * NH, t * TQ, buf);
                }
                free(buf);
            }
        }
    }
    if (l > 0 && !failed) {
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
        {
            float *buf = malloc(sizeof(float) * col_buf_floats(N / l));
            if (!buf) failed = 1;
#pragma omp for schedule(dynamic, 1)
            for (long it = 0; it < (long)BH * l; it++) {
                if (!buf) continue;
                long b = it / l;
                col_bwd(&sh, q + b * NH, k + b * NH, v + b * NH, dout + b * NH, lse + b * N, delta + b * N,
                        dq + b * NH, dk + b * NH, dv + b * NH, (int)(it % l), buf);
            }
            free(buf);
        }
    }
    free(delta);
    return failed ? -1 : 0;
}

int st_head_dim(void) { return HD; }
