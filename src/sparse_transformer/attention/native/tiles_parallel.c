/* The tile pass over all sequences and threads: forward, and the backward's ownership of key rows.
 * Included by kernel.c (its vector types, ISA constants and helpers); not compiled on its own. */

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
