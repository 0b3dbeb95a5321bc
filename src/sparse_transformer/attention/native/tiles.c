/* The tile pass: any pattern from its description, one tile at a time.
 * Included by kernel.c (its vector types, ISA constants and helpers); not compiled on its own. */

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
    transpose_tile(s->q + (size_t)rq * HD, rows, TQ, ts->Qt, d->scale * LOG2E);
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
    transpose_tile(Qr, rows, TQ, ts->Qt, d->scale * LOG2E);
    transpose_tile(dOr, rows, TQ, ts->dOt, 1.0f);
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
