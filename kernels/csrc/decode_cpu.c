/* Matrix-vector products for one-token decoding on CPU, float32.
 *
 * At decode time a linear layer multiplies a handful of activation rows by a large weight, so
 * its speed is how fast the weight streams from memory. The BLAS behind torch runs such a
 * product at well under half of one core's memory bandwidth here (see BENCHMARKS.md); this loop
 * reads each weight row once, straight through, and forms the dot product with every
 * activation row while that weight row is in L1.
 *
 * Layouts (contiguous): W [rows, cols], x [batch, cols], bias [rows] or NULL, y [batch, rows].
 * gemv_rows fills output columns [r0, r1); gemv splits all of them over the worker threads.
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#if defined(__SSE__)
#include <xmmintrin.h>
/* decays exp(dt * A) may underflow: flush denormals inside the kernel only, then restore */
#define FTZ_BEGIN const unsigned int saved_csr = _mm_getcsr(); _mm_setcsr(saved_csr | 0x8040);
#define FTZ_END _mm_setcsr(saved_csr);
#define CPU_RELAX() _mm_pause()
#else
#define FTZ_BEGIN
#define FTZ_END
#define CPU_RELAX() ((void)0)
#endif

static inline float dot(const float *restrict a, const float *restrict b, int64_t n) {
    float acc = 0.0f;
    for (int64_t j = 0; j < n; ++j) acc += a[j] * b[j];  /* vectorised under -ffast-math */
    return acc;
}

void gemv_rows(const float *restrict W, const float *restrict x, const float *restrict bias,
               float *restrict y, int64_t batch, int64_t rows, int64_t cols, int64_t r0,
               int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
        const float *w = W + r * cols;
        const float b = bias ? bias[r] : 0.0f;
        for (int64_t i = 0; i < batch; ++i) y[i * rows + r] = dot(w, x + i * cols, cols) + b;
    }
}

/* ---- worker threads for gemv ---------------------------------------------------------------
 * A weight matrix streams faster from two cores than from one, and a decode step runs dozens
 * of products in a row, so workers stay alive between calls: each spins for the next job for
 * up to SPIN_NS (a step's products come microseconds apart, and waking a sleeping thread can
 * cost more than a product) and then sleeps on a condition variable.
 * Worker i computes part i + 1 of the rows; the calling thread computes part 0 and waits.
 * A process forked after the workers started has none: the pool is rebuilt on first use. */
#define MAX_WORKERS 63
#define SPIN_NS 200000  /* how long an idle worker spins before it sleeps: 0.2 ms */

typedef struct { const float *W, *x, *bias; float *y; int64_t batch, rows, cols, step; } gemv_job;

static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_cv = PTHREAD_COND_INITIALIZER;
static gemv_job pool_job;
static int64_t pool_generation = 0, pool_pending = 0;
static int pool_workers = 0, pool_wanted = 0, pool_busy = 0;
static pid_t pool_pid = 0;
static int64_t pool_start_generation[MAX_WORKERS + 1];

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void run_part(const gemv_job *j, int64_t part) {
    const int64_t r0 = part * j->step, r1 = r0 + j->step < j->rows ? r0 + j->step : j->rows;
    if (r0 < r1) gemv_rows(j->W, j->x, j->bias, j->y, j->batch, j->rows, j->cols, r0, r1);
}

static void *worker_main(void *arg) {
    const int64_t part = (int64_t)(intptr_t)arg;
    int64_t seen = pool_start_generation[part];  /* jobs posted before this thread ran count */
    for (;;) {
        const int64_t spin_until = now_ns() + SPIN_NS;
        int64_t spins = 0;
        while (__atomic_load_n(&pool_generation, __ATOMIC_ACQUIRE) == seen) {
            if ((++spins & 255) || now_ns() < spin_until) { CPU_RELAX(); continue; }
            pthread_mutex_lock(&pool_mu);
            while (__atomic_load_n(&pool_generation, __ATOMIC_ACQUIRE) == seen)
                pthread_cond_wait(&pool_cv, &pool_mu);
            pthread_mutex_unlock(&pool_mu);
        }
        seen = __atomic_load_n(&pool_generation, __ATOMIC_ACQUIRE);
        gemv_job job = pool_job;
        run_part(&job, part);
        __atomic_sub_fetch(&pool_pending, 1, __ATOMIC_ACQ_REL);
    }
    return NULL;
}

/* Threads for gemv from now on, the caller included (1 = no workers). Returns the number set. */
int64_t decode_set_threads(int64_t n) {
    pool_wanted = n < 1 ? 0 : (n - 1 > MAX_WORKERS ? MAX_WORKERS : (int)(n - 1));
    return pool_wanted + 1;
}

static int ensure_workers(void) {
    if (pool_pid != getpid()) {  /* first use, or a forked child: no workers exist here */
        pthread_mutex_init(&pool_mu, NULL);
        pthread_cond_init(&pool_cv, NULL);
        pool_workers = 0;
        pool_pid = getpid();
    }
    while (pool_workers < pool_wanted) {
        pthread_t t;
        pool_start_generation[pool_workers + 1] = __atomic_load_n(&pool_generation, __ATOMIC_ACQUIRE);
        if (pthread_create(&t, NULL, worker_main, (void *)(intptr_t)(pool_workers + 1)) != 0) break;
        pthread_detach(t);
        pool_workers++;
    }
    return pool_workers < pool_wanted ? pool_workers : pool_wanted;
}

void gemv(const float *W, const float *x, const float *bias, float *y, int64_t batch,
          int64_t rows, int64_t cols) {
    /* tiny products are not worth a hand-off; a second caller thread meanwhile runs alone */
    int workers = 0;
    if (rows * cols >= (1 << 16) && !__atomic_exchange_n(&pool_busy, 1, __ATOMIC_ACQUIRE)) {
        workers = ensure_workers();
        if (workers == 0) __atomic_store_n(&pool_busy, 0, __ATOMIC_RELEASE);
    }
    if (workers == 0) { gemv_rows(W, x, bias, y, batch, rows, cols, 0, rows); return; }
    const int64_t parts = workers + 1;
    gemv_job job = {W, x, bias, y, batch, rows, cols, ((rows + parts - 1) / parts + 15) / 16 * 16};
    pool_job = job;
    __atomic_store_n(&pool_pending, (int64_t)workers, __ATOMIC_RELEASE);
    pthread_mutex_lock(&pool_mu);
    __atomic_add_fetch(&pool_generation, 1, __ATOMIC_ACQ_REL);
    pthread_cond_broadcast(&pool_cv);
    pthread_mutex_unlock(&pool_mu);
    run_part(&job, 0);
    while (__atomic_load_n(&pool_pending, __ATOMIC_ACQUIRE) > 0) CPU_RELAX();
    __atomic_store_n(&pool_busy, 0, __ATOMIC_RELEASE);
}

/* ---- one Mamba-2 decoding step, between in_proj and out_proj ------------------------------
 *
 * zxbcdt [batch, d_inner + conv_dim + nheads] is in_proj's output for one token, in the order
 * [z, x, B, C, dt] (conv_dim = d_inner + 2 * ngroups * dstate). In place: conv_state
 * [batch, conv_dim, width] (newest input last) and ssm_state [batch, nheads, headdim, dstate].
 * Out: y [batch, d_inner], gated and normalised, ready for out_proj. Per head: A, dt_bias;
 * D is per head or, with d_per_channel, per channel. norm_w NULL means y * silu(z), else the
 * grouped RMSNorm of Mamba-2 (groups of d_inner / ngroups channels), before or after the gate.
 * Each call handles batch rows [b0, b1).
 */
static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* One token through the depthwise causal conv: roll each channel's window (state [dim, width],
 * newest last), append x, and write silu(window . w + bias) to out [dim]. */
static void conv_step(float *restrict state, const float *restrict x, const float *restrict w,
                      const float *restrict bias, float *restrict out, int64_t dim, int64_t width) {
    for (int64_t c = 0; c < dim; ++c) {
        float *s = state + c * width;
        const float *wc = w + c * width;
        float acc = bias ? bias[c] : 0.0f;
        for (int64_t k = 0; k + 1 < width; ++k) { s[k] = s[k + 1]; acc += s[k] * wc[k]; }
        s[width - 1] = x[c];
        out[c] = silu(acc + x[c] * wc[width - 1]);
    }
}

void mamba2_step(const float *restrict zxbcdt, float *restrict conv_state,
                 const float *restrict conv_w, const float *restrict conv_b,
                 float *restrict ssm_state, const float *restrict A, const float *restrict dt_bias,
                 const float *restrict D, int64_t d_per_channel, const float *restrict norm_w,
                 int64_t norm_before_gate, float eps, float dt_lo, float dt_hi,
                 float *restrict y, int64_t nheads, int64_t headdim, int64_t dstate,
                 int64_t ngroups, int64_t width, int64_t b0, int64_t b1) {
    FTZ_BEGIN
    const int64_t d_inner = nheads * headdim, conv_dim = d_inner + 2 * ngroups * dstate;
    const int64_t row = d_inner + conv_dim + nheads, heads_per_group = nheads / ngroups;
    float *xbc = (float *)malloc(sizeof(float) * conv_dim);
    for (int64_t b = b0; b < b1; ++b) {
        const float *z = zxbcdt + b * row, *in = z + d_inner, *dt_raw = in + conv_dim;
        conv_step(conv_state + b * conv_dim * width, in, conv_w, conv_b, xbc, conv_dim, width);
        const float *x = xbc, *Bm = xbc + d_inner, *Cm = Bm + ngroups * dstate;
        float *yb = y + b * d_inner;
        for (int64_t h = 0; h < nheads; ++h) {
            float dt = dt_raw[h] + dt_bias[h];
            dt = dt <= 20.0f ? log1pf(expf(dt)) : dt;  /* softplus, as torch's threshold 20 */
            dt = fminf(fmaxf(dt, dt_lo), dt_hi);
            const float decay = expf(dt * A[h]);
            const int64_t g = h / heads_per_group;
            const float *Bg = Bm + g * dstate, *Cg = Cm + g * dstate;
            for (int64_t p = 0; p < headdim; ++p) {
                const int64_t ch = h * headdim + p;
                float *st = ssm_state + ((b * nheads + h) * headdim + p) * dstate;
                const float dx = dt * x[ch];
                float acc = 0.0f;
                for (int64_t n = 0; n < dstate; ++n) {
                    st[n] = st[n] * decay + dx * Bg[n];
                    acc += st[n] * Cg[n];
                }
                yb[ch] = acc + x[ch] * D[d_per_channel ? ch : h];
            }
        }
        const int64_t gsize = d_inner / ngroups;
        for (int64_t g = 0; g < ngroups; ++g) {  /* gate and grouped RMSNorm */
            float *v = yb + g * gsize;
            const float *zg = z + g * gsize;
            if (norm_w == NULL || !norm_before_gate)
                for (int64_t i = 0; i < gsize; ++i) v[i] *= silu(zg[i]);
            if (norm_w == NULL) continue;
            float ss = 0.0f;
            for (int64_t i = 0; i < gsize; ++i) ss += v[i] * v[i];
            const float scale = 1.0f / sqrtf(ss / (float)gsize + eps);
            const float *wg = norm_w + g * gsize;
            for (int64_t i = 0; i < gsize; ++i) v[i] *= scale * wg[i];
            if (norm_before_gate)
                for (int64_t i = 0; i < gsize; ++i) v[i] *= silu(zg[i]);
        }
    }
    free(xbc);
    FTZ_END
}

/* residual_out = hidden + residual (residual NULL: hidden); normed = rmsnorm(residual_out) * w.
 * hidden, residual, residual_out, normed: [batch, dim]; residual_out may alias residual. */
void add_rms_norm(const float *hidden, const float *residual, const float *restrict weight,
                  float *residual_out, float *restrict normed, int64_t batch, int64_t dim,
                  float eps) {
    for (int64_t b = 0; b < batch; ++b) {
        const float *h = hidden + b * dim, *r = residual ? residual + b * dim : NULL;
        float *ro = residual_out + b * dim, *o = normed + b * dim;
        float ss = 0.0f;
        for (int64_t i = 0; i < dim; ++i) {
            const float v = r ? h[i] + r[i] : h[i];
            ro[i] = v;
            ss += v * v;
        }
        const float scale = 1.0f / sqrtf(ss / (float)dim + eps);
        for (int64_t i = 0; i < dim; ++i) o[i] = ro[i] * scale * weight[i];
    }
}

/* One whole Mamba-2 block for one token, for a few rows (batch <= 4 or so):
 * residual_out = hidden + residual; u = rmsnorm(residual_out) * norm_w; zxbcdt = in_proj(u);
 * y = mamba2_step(zxbcdt); out = out_proj(y). One call instead of a dozen keeps a
 * bandwidth-bound step from being dominated by per-call overhead. Scratch: u [batch, d_model],
 * zxbcdt [batch, d_in_proj], y [batch, d_inner]. */
void mamba2_block_step(const float *hidden, const float *residual, float *residual_out,
                       const float *norm_w, float norm_eps, float *u, const float *in_w,
                       const float *in_b, float *zxbcdt, float *conv_state, const float *conv_w,
                       const float *conv_b, float *ssm_state, const float *A,
                       const float *dt_bias, const float *D, int64_t d_per_channel,
                       const float *gate_norm_w, int64_t norm_before_gate, float gate_eps,
                       float dt_lo, float dt_hi, float *y, const float *out_w,
                       const float *out_b, float *out, int64_t batch, int64_t d_model,
                       int64_t nheads, int64_t headdim, int64_t dstate, int64_t ngroups,
                       int64_t width) {
    const int64_t d_inner = nheads * headdim;
    const int64_t d_in_proj = 2 * d_inner + 2 * ngroups * dstate + nheads;
    add_rms_norm(hidden, residual, norm_w, residual_out, u, batch, d_model, norm_eps);
    gemv(in_w, u, in_b, zxbcdt, batch, d_in_proj, d_model);
    mamba2_step(zxbcdt, conv_state, conv_w, conv_b, ssm_state, A, dt_bias, D, d_per_channel,
                gate_norm_w, norm_before_gate, gate_eps, dt_lo, dt_hi, y, nheads, headdim,
                dstate, ngroups, width, 0, batch);
    gemv(out_w, y, out_b, out, batch, d_model, d_inner);
}

/* One whole Mamba-1 block for one token, for a few rows: residual add + RMSNorm, in_proj to
 * [x, z], conv window + silu on x, x_proj to [dt_low, B, C], dt = dt_proj(dt_low), the
 * selective state update per channel (dt = softplus(dt + dt_bias), state [batch, d_inner, n]),
 * y = (state . C + D x) * silu(z), out_proj. A [d_inner, n] is -exp(A_log), from the caller.
 * Scratch: u [batch, d_model], xz [batch, 2 d_inner], xc [batch, d_inner],
 * x_dbl [batch, dt_rank + 2 n], dt [batch, d_inner], y [batch, d_inner]. */
void mamba1_block_step(const float *hidden, const float *residual, float *residual_out,
                       const float *norm_w, float norm_eps, float *u, const float *in_w,
                       const float *in_b, float *xz, float *conv_state, const float *conv_w,
                       const float *conv_b, float *xc, const float *x_proj_w, float *x_dbl,
                       const float *dt_proj_w, float *dt, const float *dt_bias, const float *A,
                       const float *D, float *ssm_state, float *y, const float *out_w,
                       const float *out_b, float *out, int64_t batch, int64_t d_model,
                       int64_t d_inner, int64_t dt_rank, int64_t dstate, int64_t width) {
    FTZ_BEGIN
    const int64_t n_dbl = dt_rank + 2 * dstate;
    add_rms_norm(hidden, residual, norm_w, residual_out, u, batch, d_model, norm_eps);
    gemv(in_w, u, in_b, xz, batch, 2 * d_inner, d_model);
    for (int64_t b = 0; b < batch; ++b)
        conv_step(conv_state + b * d_inner * width, xz + b * 2 * d_inner, conv_w, conv_b,
                  xc + b * d_inner, d_inner, width);
    gemv(x_proj_w, xc, NULL, x_dbl, batch, n_dbl, d_inner);
    for (int64_t b = 0; b < batch; ++b)  /* dt_proj reads the first dt_rank entries of each row */
        gemv_rows(dt_proj_w, x_dbl + b * n_dbl, NULL, dt + b * d_inner, 1, d_inner, dt_rank, 0,
                  d_inner);
    for (int64_t b = 0; b < batch; ++b) {
        const float *Bm = x_dbl + b * n_dbl + dt_rank, *Cm = Bm + dstate;
        const float *z = xz + b * 2 * d_inner + d_inner, *x = xc + b * d_inner;
        for (int64_t c = 0; c < d_inner; ++c) {
            float d = dt[b * d_inner + c] + dt_bias[c];
            d = d <= 20.0f ? log1pf(expf(d)) : d;
            float *st = ssm_state + (b * d_inner + c) * dstate;
            const float *Ac = A + c * dstate;
            const float dx = d * x[c];
            float acc = 0.0f;
            for (int64_t n = 0; n < dstate; ++n) {
                st[n] = st[n] * expf(d * Ac[n]) + dx * Bm[n];
                acc += st[n] * Cm[n];
            }
            y[b * d_inner + c] = (acc + D[c] * x[c]) * silu(z[c]);
        }
    }
    gemv(out_w, y, out_b, out, batch, d_model, d_inner);
    FTZ_END
}
