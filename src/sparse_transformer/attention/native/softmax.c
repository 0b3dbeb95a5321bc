/* The softmax of a tile's scores, forward and backward, in base 2.
 * Included by kernel.c (its vector types, ISA constants and helpers); not compiled on its own. */

/* --------------------------------------------------------------- softmax
 * Scores are kept transposed, St[j][a] for key j and query a of a tile
 * (nv <= TQ / VL vectors of queries), so the softmax over keys runs down the
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
static void softmax_cols(float *St, int W, int nv, const int *lo, const int *hi, float *lse, float *inv)
{
    for (int v = 0; v < nv; v++) {
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
static void grad_cols(float *St, float *dPt, int W, int nv, const int *lo, const int *hi, float scale, const float *lse,
                      const float *delta)
{
    for (int v = 0; v < nv; v++) {
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
