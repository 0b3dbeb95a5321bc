/* Standalone check of native.c against naive loops: forward and backward of
 * Local, Strided and StridedColumns on a few shapes. Built for any target
 * (test_native_isa.py builds it for AVX2, AVX-512 and arm64 under qemu):
 *   cc -O2 -fopenmp -DHD=32 check_kernel.c -lm && ./a.out
 * The local window w must not exceed the stride l (the kernel adds the two
 * passes; Strided uses w = l). Prints one line per case, exits 1 on a mismatch. */
#include "../../src/sparse_transformer/attention/native.c"
#include <stdio.h>

static int allowed(int i, int j, int w, int l, int strict)
{
    if (j > i) return 0;
    if (w > 0 && i - j < w) return 1;
    return l > 0 && (i - j) % l == 0 && !(strict && i == j);
}

/* Dense masked attention of one sequence and its gradients, in double. */
static void naive(int N, int w, int l, int strict, float scale, const float *q, const float *k, const float *v,
                  const float *dout, double *o, double *dq, double *dk, double *dv)
{
    double *p = calloc((size_t)N * N, sizeof(double));
    memset(o, 0, sizeof(double) * N * HD);
    memset(dq, 0, sizeof(double) * N * HD);
    memset(dk, 0, sizeof(double) * N * HD);
    memset(dv, 0, sizeof(double) * N * HD);
    for (int i = 0; i < N; i++) {
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

static double maxdiff(const float *a, const double *b, size_t n)
{
    double e = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs(a[i] - b[i]);
        if (!(d <= e)) e = d; /* NaN counts as a mismatch */
    }
    return e;
}

int main(void)
{
    struct { int N, w, l, strict; } cases[] = {
        {1, 5, 5, 1}, {17, 5, 5, 1}, {100, 10, 10, 1}, {257, 9, 0, 1}, {96, 0, 6, 0}, {300, 0, 12, 0},
        {64, 1, 1, 1}, {130, 7, 13, 1}, {200, 40, 40, 1},
    };
    int failed = 0;
    unsigned seed = 1;
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        int N = cases[c].N, w = cases[c].w, l = cases[c].l, strict = cases[c].strict, BH = 2;
        if (l > 0 && N % l) N += l - N % l; /* the kernel's column pass wants N a multiple of l */
        size_t n = (size_t)BH * N * HD;
        float *t[8], *lse = malloc(sizeof(float) * BH * N);
        for (int i = 0; i < 8; i++) t[i] = calloc(n, sizeof(float));
        float *q = t[0], *k = t[1], *v = t[2], *dout = t[3], *o = t[4], *dq = t[5], *dk = t[6], *dv = t[7];
        for (size_t i = 0; i < 4 * n; i++) {
            seed = seed * 1664525u + 1013904223u;
            t[i / n][i % n] = (float)((seed >> 8) & 0xffff) / 32768.0f - 1.0f;
        }
        float scale = 1.0f / sqrtf((float)HD);
        int rc = st_forward(BH, N, w, l, strict, scale, 2, q, k, v, o, lse);
        rc |= st_backward(BH, N, w, l, strict, scale, 2, q, k, v, o, dout, lse, dq, dk, dv);
        double *ref = malloc(sizeof(double) * 4 * N * HD), err = 0;
        for (int b = 0; b < BH; b++) {
            size_t off = (size_t)b * N * HD;
            naive(N, w, l, strict, scale, q + off, k + off, v + off, dout + off, ref, ref + N * HD,
                  ref + 2 * N * HD, ref + 3 * N * HD);
            const float *got[4] = {o + off, dq + off, dk + off, dv + off};
            for (int g = 0; g < 4; g++) {
                double e = maxdiff(got[g], ref + (size_t)g * N * HD, (size_t)N * HD);
                if (!(e <= err)) err = e;
            }
        }
        int ok = rc == 0 && err < 1e-4;
        failed |= !ok;
        printf("%s VL=%d TQ=%d HD=%d N=%d w=%d l=%d strict=%d max error %.2e\n", ok ? "ok  " : "FAIL", VL, TQ, HD, N,
               w, l, strict, err);
        for (int i = 0; i < 8; i++) free(t[i]);
        free(lse);
        free(ref);
    }
    return failed;
}
