/* Mamba-1 selective scan on CPU: forward and backward, float32 storage and accumulation.
 *
 * Sequential over time, vectorised over the state dimension n, one channel d at a time, so no
 * [batch, len, dim, n] tensor ever exists. The forward pass stores the state every K steps;
 * the backward pass recomputes each K-step segment from its checkpoint into a small buffer
 * and runs the adjoint recurrence backwards through it.
 *
 * Layouts (contiguous):
 *   u, delta, y, dy, du, ddelta : [batch, dim, len]
 *   A, dA                       : [dim, n]
 *   B, C, dB, dC                : [batch, groups, len, n] given by element strides (batch, group,
 *                                 time) with n contiguous; dim / groups channels share a group.
 *                                 A stride of 0 broadcasts: a constant B (one [n] row per channel,
 *                                 shared over batch and time) is groups = dim, strides (0, n, 0).
 *                                 B and C may have different groups and strides.
 *   seq_idx                     : [batch, len] int32, or NULL; a change resets the state
 *   last_state                  : [batch, dim, n]
 *   ckpt                        : [batch, dim, ceil(len / K), n]  state entering step k*K
 * Each call handles channels [d0, d1); callers run disjoint ranges on separate threads.
 * dA rows are owned by the channel's thread; dB / dC are per-thread partial sums laid out with
 * the same strides as B / C (a stride-0 axis accumulates into one row).
 * The Python caller validates every shape, stride, dtype and device before calling.
 */

#include <math.h>
#include <stdint.h>
#if defined(__SSE__)
#include <xmmintrin.h>
/* Flush denormals to zero inside the kernel only (decays of exp(-large) would otherwise make
 * every multiply ~100x slower); the caller's floating-point mode is restored on exit. */
#define FTZ_BEGIN const unsigned int saved_csr = _mm_getcsr(); _mm_setcsr(saved_csr | 0x8040);
#define FTZ_END _mm_setcsr(saved_csr);
#else
#define FTZ_BEGIN
#define FTZ_END
#endif
#include <stdlib.h>
#include <string.h>

typedef struct {
    int64_t groups, batch, group, time; /* group count and element strides */
} layout_t;

static inline int64_t offset(const layout_t *l, int64_t b, int64_t d, int64_t dim) {
    return b * l->batch + (d / (dim / l->groups)) * l->group;
}

static inline int is_reset(const int32_t *seq, int64_t t) {
    return seq != NULL && t > 0 && seq[t] != seq[t - 1];
}

void ss_forward(const float *u, const float *delta, const float *A, const float *B, const float *C,
                const int32_t *seq_idx, float *y, float *last_state, float *ckpt,
                int64_t batch, int64_t dim, int64_t n, int64_t len, int64_t K,
                int64_t gB, int64_t sBb, int64_t sBg, int64_t sBt,
                int64_t gC, int64_t sCb, int64_t sCg, int64_t sCt, int64_t d0, int64_t d1) {
    FTZ_BEGIN
    const int64_t nck = (len + K - 1) / K;
    const layout_t lB = {gB, sBb, sBg, sBt}, lC = {gC, sCb, sCg, sCt};
    float *h = (float *)malloc(sizeof(float) * n);
    for (int64_t b = 0; b < batch; ++b) {
        const int32_t *seq = seq_idx ? seq_idx + b * len : NULL;
        for (int64_t d = d0; d < d1; ++d) {
            const float *Ad = A + d * n;
            const float *Bg = B + offset(&lB, b, d, dim);
            const float *Cg = C + offset(&lC, b, d, dim);
            const float *ud = u + (b * dim + d) * len;
            const float *dd = delta + (b * dim + d) * len;
            float *yd = y + (b * dim + d) * len;
            float *ck = ckpt + (b * dim + d) * nck * n;
            memset(h, 0, sizeof(float) * n);
            for (int64_t t = 0; t < len; ++t) {
                if (t % K == 0) memcpy(ck + (t / K) * n, h, sizeof(float) * n);
                const float dt = dd[t], du = dt * ud[t];
                const float *Bt = Bg + t * sBt, *Ct = Cg + t * sCt;
                const float keep = is_reset(seq, t) ? 0.0f : 1.0f;
                float acc = 0.0f;
                for (int64_t k = 0; k < n; ++k) {
                    h[k] = keep * expf(dt * Ad[k]) * h[k] + du * Bt[k];
                    acc += Ct[k] * h[k];
                }
                yd[t] = acc;
            }
            memcpy(last_state + (b * dim + d) * n, h, sizeof(float) * n);
        }
    }
    free(h);
    FTZ_END
}

void ss_backward(const float *u, const float *delta, const float *A, const float *B,
                 const float *C, const int32_t *seq_idx, const float *ckpt, const float *dy,
                 float *du_out, float *ddelta_out, float *dA, float *dB, float *dC,
                 int64_t batch, int64_t dim, int64_t n, int64_t len, int64_t K,
                 int64_t gB, int64_t sBb, int64_t sBg, int64_t sBt,
                 int64_t gC, int64_t sCb, int64_t sCg, int64_t sCt, int64_t d0, int64_t d1) {
    FTZ_BEGIN
    const int64_t nck = (len + K - 1) / K;
    const layout_t lB = {gB, sBb, sBg, sBt}, lC = {gC, sCb, sCg, sCt};
    float *hs = (float *)malloc(sizeof(float) * (K + 1) * n); /* h_{t0-1} .. h_{t1-1} */
    float *as = (float *)malloc(sizeof(float) * K * n);       /* decay a_t per step */
    float *carry = (float *)malloc(sizeof(float) * n);        /* a_{t+1} * dL/dh_{t+1} */
    for (int64_t d = d0; d < d1; ++d) {
        const float *Ad = A + d * n;
        float *dAd = dA + d * n;
        for (int64_t b = 0; b < batch; ++b) {
            const int32_t *seq = seq_idx ? seq_idx + b * len : NULL;
            const int64_t oB = offset(&lB, b, d, dim), oC = offset(&lC, b, d, dim);
            const float *Bg = B + oB, *Cg = C + oC;
            float *dBg = dB + oB, *dCg = dC + oC;
            const float *ud = u + (b * dim + d) * len;
            const float *dd = delta + (b * dim + d) * len;
            const float *dyd = dy + (b * dim + d) * len;
            float *dud = du_out + (b * dim + d) * len;
            float *ddd = ddelta_out + (b * dim + d) * len;
            const float *ck = ckpt + (b * dim + d) * nck * n;
            memset(carry, 0, sizeof(float) * n);
            for (int64_t seg = nck - 1; seg >= 0; --seg) {
                const int64_t t0 = seg * K;
                const int64_t t1 = (t0 + K < len) ? t0 + K : len;
                memcpy(hs, ck + seg * n, sizeof(float) * n);
                for (int64_t t = t0; t < t1; ++t) {
                    const int64_t i = t - t0;
                    const float dt = dd[t], du = dt * ud[t];
                    const float *Bt = Bg + t * sBt;
                    const float keep = is_reset(seq, t) ? 0.0f : 1.0f;
                    for (int64_t k = 0; k < n; ++k) {
                        const float a = keep * expf(dt * Ad[k]);
                        as[i * n + k] = a;
                        hs[(i + 1) * n + k] = a * hs[i * n + k] + du * Bt[k];
                    }
                }
                for (int64_t t = t1 - 1; t >= t0; --t) {
                    const int64_t i = t - t0;
                    const float dt = dd[t], ut = ud[t], du = dt * ut, dyt = dyd[t];
                    const float *Bt = Bg + t * sBt, *Ct = Cg + t * sCt;
                    float *dBt = dBg + t * sBt, *dCt = dCg + t * sCt;
                    const float *h_prev = hs + i * n, *h_now = hs + (i + 1) * n;
                    const float *a = as + i * n;
                    float d_du = 0.0f, d_dt = 0.0f;
                    for (int64_t k = 0; k < n; ++k) {
                        const float G = carry[k] + dyt * Ct[k]; /* dL/dh_t */
                        dCt[k] += dyt * h_now[k];
                        const float da = G * h_prev[k] * a[k]; /* through a_t = exp(dt*A) */
                        d_dt += da * Ad[k];
                        dAd[k] += da * dt;
                        d_du += G * Bt[k];
                        dBt[k] += G * du;
                        carry[k] = G * a[k];
                    }
                    dud[t] = d_du * dt;
                    ddd[t] = d_du * ut + d_dt;
                }
            }
        }
    }
    free(hs);
    free(as);
    free(carry);
    FTZ_END
}
