/* Standalone check of native/kernel.c against naive loops: forward and backward of
 * every kind of description (patterns/tiles.py) on a few shapes: a causal band
 * (Local), a band plus the column pass (Strided), the columns alone
 * (StridedColumns), a gathered view of FULL intervals plus a band (Fixed), and
 * byte masks (a dilated window). Built for any target (test_native_isa.py
 * builds it for AVX2, AVX-512 and arm64 under qemu):
 *   cc -O2 -fopenmp -DHD=32 check_kernel.c -lm && ./a.out
 * Prints one line per case, exits 1 on a mismatch. */
#include "../../src/sparse_transformer/attention/native/kernel.c"
#include <stdio.h>

enum { BANDED, FIXED, DILATED, DILATED_COLUMNS };

typedef struct { int N, kind, w, l, strict; } Case;

static const Case *cur;

/* kind BANDED: a band of w (0: none) plus columns of stride l (0: none; w <= l, or the two overlap);
 * FIXED: blocks of l with summary columns l - w .. l - 1; DILATED: (i - j) % l == 0, (i - j) / l < w,
 * from byte masks (DILATED) or as a window of w in the column pass (DILATED_COLUMNS). */
static int allowed(int i, int j, int w, int l, int strict)
{
    if (j > i) return 0;
    if (cur->kind == FIXED) return j / l == i / l || j % l >= l - w;
    if (cur->kind >= DILATED) return (i - j) % l == 0 && (i - j) / l < w;
    if (w > 0 && i - j < w) return 1;
    return l > 0 && (i - j) % l == 0 && !(strict && i == j);
}

/* The description of the case, as patterns/tiles.py builds it. */
static Desc describe(const Case *c, float scale, int *ptr, int *iv, int *gpos, uint8_t *masks)
{
    int N = c->N, ntiles = (N + TQ - 1) / TQ, n = 0, ng = 0, maxw = 0;
    size_t off = 0;
    if (c->kind == FIXED)
        for (int b = 0; b < (N - 1) / c->l; b++)
            for (int t = 0; t < c->w; t++) gpos[ng++] = b * c->l + c->l - c->w + t;
    for (int t = 0; t < ntiles; t++) {
        int r0 = t * TQ, r1 = imin(N, r0 + TQ), W = 0;
        ptr[t] = n;
        int *e = iv + 5 * n;
        if (c->kind == BANDED && c->w > 0) {
            int e5[5] = {0, imax(0, r0 - c->w + 1), r1, IV_BAND, c->w};
            memcpy(e, e5, sizeof e5), n++;
        } else if (c->kind == FIXED) { /* TQ divides l: a tile sits in one block */
            int b = r0 / c->l;
            int e10[10] = {1, 0, b * c->w, IV_FULL, 0, 0, b * c->l, r1, IV_BAND, 0};
            memcpy(e, e10, sizeof e10), n += 2;
        } else if (c->kind == DILATED) {
            int e5[5] = {0, 0, r1, IV_MASK, (int)off};
            memcpy(e, e5, sizeof e5), n++;
            for (int i = r0; i < r1; i++)
                for (int j = 0; j < r1; j++) masks[off++] = (uint8_t)allowed(i, j, c->w, c->l, 0);
        }
        for (int x = ptr[t]; x < n; x++) W += iv[5 * x + 2] - iv[5 * x + 1];
        maxw = imax(maxw, W);
    }
    ptr[ntiles] = n;
    Desc d = {N, ntiles, imax(maxw, 1), ng, 0, ptr, iv, gpos, masks, scale};
    return d;
}

/* Dense masked attention of one sequence and its gradients, in double. */
static void naive(int N, int q0, int w, int l, int strict, float scale, const float *q, const float *k, const float *v,
                  const float *dout, double *o, double *dq, double *dk, double *dv)
{
    double *p = calloc((size_t)N * N, sizeof(double));
    memset(o, 0, sizeof(double) * N * HD);
    memset(dq, 0, sizeof(double) * N * HD);
    memset(dk, 0, sizeof(double) * N * HD);
    memset(dv, 0, sizeof(double) * N * HD);
    for (int i = q0; i < N; i++) { /* queries q0..N-1 only */
        double m = -INFINITY, sum = 0;
        for (int j = 0; j < N; j++) {
            if (!allowed(i, j, w, l, strict)) continue;
            double s = 0;
            for (int d = 0; d < HD; d++) s += (double)q[i * HD + d] * k[j * HD + d];
            p[(size_t)i * N + j] = s * scale;
            if (s * scale > m) m = s * scale;
        }
        for (int j = 0; j < N; j++)
            if (allowed(i, j, w, l, strict)) { p[(size_t)i * N + j] = exp(p[(size_t)i * N + j] - m); sum += p[(size_t)i * N + j]; }
        for (int j = 0; j < N; j++) {
            if (!allowed(i, j, w, l, strict)) continue;
            p[(size_t)i * N + j] /= sum;
            for (int d = 0; d < HD; d++) o[i * HD + d] += p[(size_t)i * N + j] * v[j * HD + d];
        }
        double delta = 0;
        for (int d = 0; d < HD; d++) delta += o[i * HD + d] * dout[i * HD + d];
        for (int j = 0; j < N; j++) {
            if (!allowed(i, j, w, l, strict)) continue;
            double pij = p[(size_t)i * N + j], dp = 0;
            for (int d = 0; d < HD; d++) dp += (double)dout[i * HD + d] * v[j * HD + d];
            double ds = pij * (dp - delta) * scale;
            for (int d = 0; d < HD; d++) {
                dq[i * HD + d] += ds * k[j * HD + d];
                dk[j * HD + d] += ds * q[i * HD + d];
                dv[j * HD + d] += pij * dout[i * HD + d];
            }
        }
    }
    free(p);
}

/* p[0..n) = NaN: a result row the kernel leaves unwritten shows as an error. */
static float *nans(float *p, size_t n)
{
    for (size_t i = 0; i < n; i++) p[i] = NAN;
    return p;
}

static double maxdiff(const float *a, const double *b, size_t n)
{
    double e = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs(a[i] - b[i]);
        if (!(d <= e)) e = d; /* NaN counts as a mismatch */
    }
    return e;
}

/* One decoding step (decode.c): B x h queries against two segments laid out as a cache lays them out,
 * a ring [B][h][R][HD] and a column view [B][h][C][M][HD] at column 1 (head stride C M HD), plus an
 * empty segment, against a naive softmax in double. */
static int check_decode(unsigned *seed)
{
    enum { B = 2, H = 3, R = 5, C = 3, M = 21, ROWS = 17 }; /* ROWS of the column's M: the part read */
    size_t nr = (size_t)B * H * R * HD, nc = (size_t)B * H * C * M * HD;
    float *buf = malloc(sizeof(float) * (2 * nr + 2 * nc + 2 * B * H * HD)), scale = 0.3f;
    for (size_t i = 0; i < 2 * nr + 2 * nc + B * H * HD; i++) {
        *seed = *seed * 1664525u + 1013904223u;
        buf[i] = (float)((*seed >> 8) & 0xffff) / 16384.0f - 2.0f;
    }
    float *rk = buf, *rv = rk + nr, *ck = rv + nr, *cv = ck + nc, *q = cv + nc, *out = q + B * H * HD;
    int64_t seg[15] = {(int64_t)(intptr_t)rk, (int64_t)(intptr_t)rv, H * R * HD, R * HD, R,
                       (int64_t)(intptr_t)(ck + M * HD), (int64_t)(intptr_t)(cv + M * HD), H * C * M * HD, C * M * HD, ROWS,
                       (int64_t)(intptr_t)rk, (int64_t)(intptr_t)rv, 0, 0, 0};
    int rc = st_decode(B, H, 3, seg, q, scale, out, 2);
    double err = 0;
    for (int b = 0; b < B; b++)
        for (int hh = 0; hh < H; hh++) {
            const float *qq = q + (b * H + hh) * HD, *rows[R + ROWS], *vals[R + ROWS];
            double s[R + ROWS], mx = -1e300, tot = 0;
            for (int j = 0; j < R + ROWS; j++) {
                size_t off = j < R ? ((size_t)(b * H + hh) * R + j) * HD
                                   : ((((size_t)b * H + hh) * C + 1) * M + (j - R)) * HD;
                rows[j] = (j < R ? rk : ck) + off;
                vals[j] = (j < R ? rv : cv) + off;
                s[j] = 0;
                for (int d = 0; d < HD; d++) s[j] += (double)qq[d] * rows[j][d];
                s[j] *= scale;
                if (s[j] > mx) mx = s[j];
            }
            for (int j = 0; j < R + ROWS; j++) tot += exp(s[j] - mx);
            for (int d = 0; d < HD; d++) {
                double o = 0;
                for (int j = 0; j < R + ROWS; j++) o += exp(s[j] - mx) / tot * vals[j][d];
                double e = fabs(o - out[(b * H + hh) * HD + d]);
                if (!(e <= err)) err = e;
            }
        }
    int ok = rc == 0 && err < 1e-4;
    printf("%s decode VL=%d HD=%d max error %.2e\n", ok ? "ok  " : "FAIL", VL, HD, err);
    free(buf);
    return !ok;
}

int main(void)
{
    Case cases[] = {
        {1, BANDED, 5, 5, 1}, {17, BANDED, 5, 5, 1}, {100, BANDED, 10, 10, 1}, {257, BANDED, 9, 0, 1},
        {96, BANDED, 0, 6, 0}, {300, BANDED, 0, 12, 0}, {64, BANDED, 1, 1, 1}, {130, BANDED, 7, 13, 1},
        {200, BANDED, 40, 40, 1}, {333, BANDED, 37, 37, 1}, {1, FIXED, 8, 64, 0}, {300, FIXED, 8, 64, 0},
        {450, FIXED, 64, 64, 0}, {150, DILATED, 5, 3, 0}, {70, DILATED, 100, 1, 0}, {150, DILATED_COLUMNS, 5, 3, 0},
        {200, DILATED_COLUMNS, 40, 2, 0}, {64, DILATED_COLUMNS, 1, 1, 0},
    };
    int failed = 0;
    unsigned seed = 1;
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        cur = &cases[c];
        int N = cases[c].N, w = cases[c].w, l = cases[c].l, strict = cases[c].strict, BH = 2;
        int cols = cur->kind == BANDED || cur->kind == DILATED_COLUMNS ? l : 0, cw = cur->kind == DILATED_COLUMNS ? w : 0;
        if (cols > 0 && N % l) N += l - N % l; /* the kernel's column pass wants N a multiple of l */
        Case padded = *cur;
        padded.N = N;
        cur = &padded;
        size_t n = (size_t)BH * N * HD;
        float *t[8], *lse = malloc(sizeof(float) * BH * N);
        for (int i = 0; i < 8; i++) t[i] = calloc(n, sizeof(float));
        float *q = t[0], *k = t[1], *v = t[2], *dout = t[3], *o = t[4], *dq = t[5], *dk = t[6], *dv = t[7];
        for (size_t i = 0; i < 4 * n; i++) {
            seed = seed * 1664525u + 1013904223u;
            t[i / n][i % n] = (float)((seed >> 8) & 0xffff) / 32768.0f - 1.0f;
        }
        float scale = 1.0f / sqrtf((float)HD);
        int *ptr = malloc(sizeof(int) * (N / TQ + 2)), *iv = malloc(sizeof(int) * 10 * (N / TQ + 2));
        int *gpos = malloc(sizeof(int) * (N + 1));
        uint8_t *masks = malloc((size_t)N * N + 1);
        Desc d = describe(cur, scale, ptr, iv, gpos, masks);
        int nt = (cur->kind == BANDED && w == 0) || cur->kind == DILATED_COLUMNS ? 0 : d.ntiles, rc = 0;
        for (int threads = 1; threads <= 4; threads *= 4) { /* 1: sequences per thread; 4 > BH: shared sequences */
            nans(dq, n), nans(dk, n), nans(dv, n); /* the kernel sets every gradient row itself */
            rc |= st_tiles_forward(BH, N, nt, d.maxw, d.ng, ptr, iv, gpos, masks, cols, strict, cw, 0, scale, threads, q, k, v, o, lse);
            rc |= st_tiles_backward(BH, N, nt, d.maxw, d.ng, ptr, iv, gpos, masks, cols, strict, cw, 0, scale, threads, q, k, v,
                                    o, dout, lse, dq, dk, dv);
        }
        free(ptr), free(iv), free(gpos), free(masks);
        double *ref = malloc(sizeof(double) * 4 * N * HD), err = 0;
        for (int b = 0; b < BH; b++) {
            size_t off = (size_t)b * N * HD;
            naive(N, 0, w, l, strict, scale, q + off, k + off, v + off, dout + off, ref, ref + N * HD,
                  ref + 2 * N * HD, ref + 3 * N * HD);
            const float *got[4] = {o + off, dq + off, dk + off, dv + off};
            for (int g = 0; g < 4; g++) {
                double e = maxdiff(got[g], ref + (size_t)g * N * HD, (size_t)N * HD);
                if (!(e <= err)) err = e;
            }
        }
        /* The queries as the last positions: q0 = TQ (a tile boundary), one sequence, rows q0.. of q. */
        int q0 = N > TQ ? TQ : 0;
        if (q0) {
            size_t NQ = (size_t)(N - q0) * HD;
            float *o2 = nans(malloc(sizeof(float) * NQ), NQ), *dq2 = nans(malloc(sizeof(float) * NQ), NQ);
            float *lse2 = malloc(sizeof(float) * N), *dk2 = nans(malloc(sizeof(float) * N * HD), (size_t)N * HD);
            float *dv2 = nans(malloc(sizeof(float) * N * HD), (size_t)N * HD);
            ptr = malloc(sizeof(int) * (N / TQ + 2)), iv = malloc(sizeof(int) * 10 * (N / TQ + 2));
            gpos = malloc(sizeof(int) * (N + 1)), masks = malloc((size_t)N * N + 1);
            d = describe(cur, scale, ptr, iv, gpos, masks);
            rc |= st_tiles_forward(1, N, nt, d.maxw, d.ng, ptr, iv, gpos, masks, cols, strict, cw, q0, scale, 2,
                                   q + q0 * HD, k, v, o2, lse2);
            rc |= st_tiles_backward(1, N, nt, d.maxw, d.ng, ptr, iv, gpos, masks, cols, strict, cw, q0, scale, 2,
                                    q + q0 * HD, k, v, o2, dout + q0 * HD, lse2, dq2, dk2, dv2);
            naive(N, q0, w, l, strict, scale, q, k, v, dout, ref, ref + N * HD, ref + 2 * N * HD, ref + 3 * N * HD);
            double e[4] = {maxdiff(o2, ref + q0 * HD, NQ), maxdiff(dq2, ref + N * HD + q0 * HD, NQ),
                           maxdiff(dk2, ref + 2 * N * HD, (size_t)N * HD), maxdiff(dv2, ref + 3 * N * HD, (size_t)N * HD)};
            for (int g = 0; g < 4; g++)
                if (!(e[g] <= err)) err = e[g];
            free(o2), free(dq2), free(lse2), free(dk2), free(dv2), free(ptr), free(iv), free(gpos), free(masks);
        }
        int ok = rc == 0 && err < 1e-4;
        failed |= !ok;
        printf("%s VL=%d TQ=%d HD=%d N=%d kind=%d w=%d l=%d strict=%d (and q0=%d) max error %.2e\n", ok ? "ok  " : "FAIL",
               VL, TQ, HD, N, cur->kind, w, l, strict, q0, err);
        for (int i = 0; i < 8; i++) free(t[i]);
        free(lse);
        free(ref);
    }
    failed |= check_decode(&seed);
    return failed;
}
