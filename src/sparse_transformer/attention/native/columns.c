/* One tile of queries against a window of keys, and strided's column pass (section 5.5).
 * Included by kernel.c (its vector types, ISA constants and helpers); not compiled on its own. */

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
    int nq = (rows + VL - 1) / VL * VL; /* query lanes computed: a short column (M < TQ) fills few */
    transpose_tile(Qr, rows, nq, ts->Qt, scale * LOG2E);
    gemm_nn(W, nq, HD, Kr, HD, ts->Qt, TQ, St, TQ, 0, k_rows(RNG_N, qlo, qhi));  /* St = K Q^T   (W, nq) */
    softmax_cols(St, W, nq / VL, ts->lo, ts->hi, ts->lse, ts->inv);
    gemm_tn(rows, HD, W, St, TQ, Vr, HD, Or, HD, 0, q_rows(qlo, qhi));          /* O = P V      (rows, HD) */
    scale_rows(Or, rows, ts->inv);
}

static void tile_bwd(const float *Qr, const float *Kr, const float *Vr, const float *dOr, int rows, int W,
                     TileScratch *ts, float *St, float *dPt, float *dQr, float *dKr, float *dVr, int ldd, float scale,
                     int qlo, int qhi)
{
    Rng n = k_rows(RNG_N, qlo, qhi), k = k_rows(RNG_K, qlo, qhi);
    int nq = (rows + VL - 1) / VL * VL;
    transpose_tile(Qr, rows, nq, ts->Qt, scale * LOG2E);
    transpose_tile(dOr, rows, nq, ts->dOt, 1.0f);
    gemm_nn(W, nq, HD, Kr, HD, ts->Qt, TQ, St, TQ, 0, n);                 /* S^T  = K Q^T    (W, nq) */
    gemm_nn(W, nq, HD, Vr, HD, ts->dOt, TQ, dPt, TQ, 0, n);               /* dP^T = V dO^T   (W, nq) */
    grad_cols(St, dPt, W, nq / VL, ts->lo, ts->hi, scale, ts->lse, ts->delta);
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
    /* the backward's Q, K, V, dO, scores, dP, L, D, dQ, dK, dV; the forward's Q, K, V, scores, output, L fit in it */
    return pad16(sizeof(TileScratch) / sizeof(float) + 7 * (size_t)M * HD + 2 * (size_t)M * TQ + 2 * pad16(M) + 64);
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

/* A row of HD floats from src to dst: ROW_ADD adds it to what is there, ROW_STREAM stores it around
 * the caches (dst aligned to the vector), ROW_COPY stores it. */
enum { ROW_COPY, ROW_ADD, ROW_STREAM };
static inline void put_row(float *dst, const float *src, int mode)
{
    if (mode == ROW_ADD)
        for (int d = 0; d < HD; d += VL) st(dst + d, ld(dst + d) + ld(src + d));
    else if (mode == ROW_STREAM)
        for (int d = 0; d < HD; d += VL) st_stream(dst + d, ld(src + d));
    else
        memcpy(dst, src, sizeof(float) * HD);
}

/* The group's column gradients, once into dQ, dK, dV (this thread owns these columns), row by row
 * (put_row's mode): added to what is there, or stored when the column pass comes first and every
 * row of the sequence lies in exactly one column. Stored rows are streamed where the tensors are
 * aligned: the tile pass reads them much later, and a plain store first reads each line, 2 KB
 * pieces 32 KB apart (l = 128). Streaming ran Strided(128) at 16,384 fwd+bwd 6% faster and
 * Strided(64) at 4,096 5% faster (AMD Zen 4, AVX-512). */
static void scatter_group(const ColGroup *cg, const Shape *sh, float *dQ, float *dK, float *dV, int mode)
{
    int l = sh->l, M = sh->N / l;
    size_t grad = 4 * (size_t)M * HD + 2 * (size_t)M * TQ + 2 * pad16(M); /* dQc's offset after Q, K, V, dO */
    for (int m = 0; m < M; m++)
        for (int g = 0; g < cg->n; g++) {
            const float *dqc = col_rows(cg->buf[g], M, 0) + grad + (size_t)m * HD;
            const float *dkc = dqc + (size_t)M * HD, *dvc = dkc + (size_t)M * HD;
            size_t row = (size_t)m * l + cg->c0 + g;
            put_row(dK + row * HD, dkc, mode);
            put_row(dV + row * HD, dvc, mode);
            if (m >= cg->first[g]) put_row(dQ + (row - sh->q0) * HD, dqc, mode);
        }
    if (mode == ROW_STREAM) fence_streams();
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
    int aligned = backward && vec_aligned(t->dq) && vec_aligned(t->dk) && vec_aligned(t->dv);
    int put = merge ? ROW_ADD : aligned ? ROW_STREAM : ROW_COPY; /* how the backward puts its gradient rows */
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
                scatter_group(&cg, sh, t->dq + b * NQ * HD, t->dk + b * NH, t->dv + b * NH, put);
            } else {
                for (int g = 0; g < cg.n; g++) col_fwd(sh, cg.c0 + g, cg.buf[g]);
                put_group(&cg, sh, t->o + b * NQ * HD, t->lse_out + b * NQ, merge);
            }
        }
        free(buf);
    }
    return failed;
}
