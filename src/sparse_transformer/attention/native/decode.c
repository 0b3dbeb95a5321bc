/* One decoding step on the CPU (not in the paper, which does not describe its sampling code).
 *
 * Included at the end of kernel.c (its vector types, vexp2 and allocation). The query of position t
 * of each (sequence, head) attends the keys its cache hands over (attention/kv_cache.py), in a few
 * segments of contiguous rows: Strided's window ring and its column, Fixed's prefix of summaries and
 * current block, a dense cache's prefix. The segments are read where they lie, so the step copies
 * nothing (torch.cat of the ring and the column took 40 us a layer), and each key and value row is
 * read once: scores, then their exponentials, then the weighted sum of the values.
 *
 * seg[5 * s ...] = {keys, values, batch stride, head stride, rows} of segment s, pointers and strides
 * (in floats) as int64; rows are HD floats apart. q and out are [B][h][HD]. float32 throughout.
 */

static float dot_row(const float *q, const float *k)
{
    vf acc = splat(0.f);
    for (int d = 0; d < HD; d += VL) acc += ld(q + d) * ld(k + d);
    float s = 0.f;
    for (int t = 0; t < VL; t++) s += acc[t];
    return s;
}

/* Query q (HD) of one (sequence, head) over the segments: out = softmax(q k^T scale) v. S holds the
 * scores (total floats, padded to a vector). No key at all: out = 0, as in attention(). */
static void decode_one(int nseg, const int64_t *seg, long b, long hh, const float *q, float scale, float *S,
                       float *out)
{
    const float c = scale * LOG2E; /* scores in base 2, as in the softmax of the tiles */
    int n = 0;
    float m = -INFINITY;
    for (int s = 0; s < nseg; s++) {
        const int64_t *e = seg + 5 * s;
        const float *K = (const float *)(intptr_t)e[0] + b * e[2] + hh * e[3];
        for (int j = 0; j < (int)e[4]; j++, n++) {
            S[n] = dot_row(q, K + (size_t)j * HD) * c;
            m = S[n] > m ? S[n] : m;
        }
    }
    vf acc[HD / VL];
    for (int v = 0; v < HD / VL; v++) acc[v] = splat(0.f);
    if (n == 0 || isinf(m)) { /* no key, or every score -inf */
        for (int v = 0; v < HD / VL; v++) st(out + v * VL, acc[v]);
        return;
    }
    vf sum = splat(0.f), vm = splat(m);
    int j = 0;
    for (; j + VL <= n; j += VL) {
        vf p = vexp2(ld(S + j) - vm);
        sum += p;
        st(S + j, p);
    }
    float tail = 0.f;
    for (; j < n; j++) { S[j] = exp2f(S[j] - m); tail += S[j]; }
    for (int t = 0; t < VL; t++) tail += sum[t];
    n = 0;
    for (int s = 0; s < nseg; s++) {
        const int64_t *e = seg + 5 * s;
        const float *V = (const float *)(intptr_t)e[1] + b * e[2] + hh * e[3];
        for (int r = 0; r < (int)e[4]; r++, n++) {
            vf p = splat(S[n]);
            for (int v = 0; v < HD / VL; v++) acc[v] += p * ld(V + (size_t)r * HD + v * VL);
        }
    }
    for (int v = 0; v < HD / VL; v++) st(out + v * VL, acc[v] * (1.0f / tail));
}

int st_decode(int B, int h, int nseg, const int64_t *seg, const float *q, float scale, float *out, int nthreads)
{
    long total = 0;
    for (int s = 0; s < nseg; s++) total += seg[5 * s + 4];
    int failed = 0;
#pragma omp parallel num_threads(imax(1, imin(nthreads, B * h))) reduction(| : failed)
    {
        float *S = malloc(sizeof(float) * (size_t)(total + VL));
        if (!S) failed = 1;
#pragma omp for schedule(static)
        for (long i = 0; i < (long)B * h; i++)
            if (S) decode_one(nseg, seg, i / h, i % h, q + i * HD, scale, S, out + i * HD);
        free(S);
    }
    return failed ? -1 : 0;
}
