/* Fused SAConv forward pass: see saconv_kernel.h for what it computes and why.
 *
 * Layout: NCHW float32 in and out. Inner loops run along image rows in vectors of 16 floats
 * (GCC vector extensions: one AVX-512 register, two AVX2 registers) with a scalar tail, so any
 * width works. Compiled with -O3 -march=native by nerveseg at first use.
 */
#include "saconv_kernel.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define VLEN 16
/* Rows per parallel task: H / CHUNK_DIVISOR tasks, 1 to MAX_CHUNKS of them. Each task computes
 * n - 1 halo rows at each inner edge twice, but the deep levels (32-64 rows of 256-512
 * channels, as much arithmetic as the first level) need more than one task to use two cores. */
#define CHUNK_DIVISOR 16
#define MAX_CHUNKS 8
#define CO_BLOCK 8   /* output channels computed together in the 1x1 convolution */

typedef float vfloat __attribute__((vector_size(VLEN * sizeof(float)), aligned(4), may_alias));
typedef int vmask __attribute__((vector_size(VLEN * sizeof(int)), aligned(4), may_alias));

static inline vfloat vload(const float *p) { return *(const vfloat *)p; }
static inline void vstore(float *p, vfloat v) { *(vfloat *)p = v; }
static inline vfloat vbroadcast(float s) { return (vfloat){0} + s; }

/* CO_BLOCK output channels at the VLEN pixels from x: out[j][x..] = bias[j] + sum_ci w[j][ci] in[ci][x..] */
static inline void pointwise_block(const float *in, ptrdiff_t in_stride, int cin, const float *w,
                                   const float *bias, float *out, ptrdiff_t out_stride, int x) {
    vfloat acc[CO_BLOCK];
    for (int j = 0; j < CO_BLOCK; j++) acc[j] = vbroadcast(bias[j]);
    for (int ci = 0; ci < cin; ci++) {
        vfloat v = vload(in + ci * in_stride + x);
        for (int j = 0; j < CO_BLOCK; j++) acc[j] += w[j * cin + ci] * v;
    }
    for (int j = 0; j < CO_BLOCK; j++) vstore(out + j * out_stride + x, acc[j]);
}

/* out[co][x] = bias[co] + sum_ci w[co][ci] * in[ci][x] for x < len; in/out rows are
 * in_stride / out_stride floats apart; out must not overlap in. A row whose length is not a
 * multiple of VLEN ends with one vector that overlaps the previous one (recomputing a few
 * outputs costs less than a scalar tail, which at the deep levels' 36- and 72-pixel rows and
 * 256-512 input channels took a large share of the time). */
static void pointwise(const float *in, ptrdiff_t in_stride, int cin, const float *w,
                      const float *bias, float *out, ptrdiff_t out_stride, int cout, int len) {
    int co = 0;
    for (; co + CO_BLOCK <= cout; co += CO_BLOCK) {
        const float *wb = w + (ptrdiff_t)co * cin;
        float *ob = out + co * out_stride;
        int x = 0;
        for (; x + VLEN <= len; x += VLEN) pointwise_block(in, in_stride, cin, wb, bias + co, ob, out_stride, x);
        if (x < len && len >= VLEN) {
            pointwise_block(in, in_stride, cin, wb, bias + co, ob, out_stride, len - VLEN);
            continue;
        }
        for (; x < len; x++) {
            for (int j = 0; j < CO_BLOCK; j++) {
                float acc = bias[co + j];
                for (int ci = 0; ci < cin; ci++) acc += wb[j * cin + ci] * in[ci * in_stride + x];
                ob[j * out_stride + x] = acc;
            }
        }
    }
    for (; co < cout; co++) { /* output channels left over when cout is not a multiple of 8 */
        const float *wr = w + (ptrdiff_t)co * cin;
        for (int x = 0; x < len; x++) {
            float acc = bias[co];
            for (int ci = 0; ci < cin; ci++) acc += wr[ci] * in[ci * in_stride + x];
            out[co * out_stride + x] = acc;
        }
    }
}

/* One output row of a depthwise 3x3 convolution: out[x] = b + sum k[dy][dx] * row_dy[x + dx - 1].
 * The three input rows carry one zero column on each side (row[-1] and row[len] are 0); out
 * must not overlap them (the tail vector overlaps the previous one, as in pointwise). */
static inline void depthwise_block(const float *const rows[3], const float *k, float b, float *out, int x) {
    vfloat acc = vbroadcast(b);
    for (int dy = 0; dy < 3; dy++)
        for (int dx = 0; dx < 3; dx++) acc += k[dy * 3 + dx] * vload(rows[dy] + x + dx - 1);
    vstore(out + x, acc);
}

static void depthwise_row(const float *up, const float *mid, const float *down, const float *k,
                          float b, float *out, int len) {
    const float *const rows[3] = {up, mid, down};
    int x = 0;
    for (; x + VLEN <= len; x += VLEN) depthwise_block(rows, k, b, out, x);
    if (x < len && len >= VLEN) {
        depthwise_block(rows, k, b, out, len - VLEN);
        return;
    }
    for (; x < len; x++) {
        float acc = b;
        for (int dy = 0; dy < 3; dy++)
            for (int dx = 0; dx < 3; dx++) acc += k[dy * 3 + dx] * rows[dy][x + dx - 1];
        out[x] = acc;
    }
}

typedef struct {
    const saconv_weights *wt;
    const float *x, *x2;
    float *y;
    int H, W, chunks, chunk_rows;
    double *sums;        /* (batch * chunks, C) per-chunk channel sums of z */
    volatile int failed; /* a task could not get its scratch memory */
    const float *scale;  /* (batch, C) gate * bn_scale, for the second pass */
    int channels;        /* C */
} saconv_job;

/* Scratch per thread, kept between calls (grown when a larger layer needs more) and freed when
 * the thread exits -- onnxruntime's pool threads end with their session. */
typedef struct {
    float *data;
    size_t floats;
} scratch_block;

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void free_scratch(void *p) {
    scratch_block *block = (scratch_block *)p;
    free(block->data);
    free(block);
}
static void make_scratch_key(void) { pthread_key_create(&scratch_key, free_scratch); }

static float *get_scratch(size_t floats) {
    pthread_once(&scratch_once, make_scratch_key);
    scratch_block *block = (scratch_block *)pthread_getspecific(scratch_key);
    if (!block) {
        block = (scratch_block *)calloc(1, sizeof *block);
        if (!block || pthread_setspecific(scratch_key, block)) {
            free(block);
            return NULL;
        }
    }
    if (floats > block->floats) {
        free(block->data);
        block->data = (float *)aligned_alloc(64, ((floats * sizeof(float) + 63) / 64) * 64);
        block->floats = block->data ? floats : 0;
    }
    return block->data;
}

/* dst = src and returns sum(src), for one row. */
static double copy_row_sum(float *dst, const float *src, int len) {
    vfloat acc = vbroadcast(0.0f);
    int x = 0;
    for (; x + VLEN <= len; x += VLEN) {
        vfloat v = vload(src + x);
        vstore(dst + x, v);
        acc += v;
    }
    double s = 0.0;
    for (int i = 0; i < VLEN; i++) s += acc[i];
    for (; x < len; x++) {
        dst[x] = src[x];
        s += src[x];
    }
    return s;
}

static inline int mod3(int r) { return ((r % 3) + 3) % 3; }

/* F_1 for image row r: the 1x1 convolution W_1 of the input row. Input rows of different channels
 * lie H*W floats apart, which for 2^k-sized images maps them onto the same cache sets; they are
 * read from a copy with a skewed stride (xrow, xs apart) instead. With a second input the copy
 * gathers both (the concatenation); with upsampling the convolution runs on the low-resolution
 * row and its output is duplicated horizontally (nearest neighbour commutes with a 1x1). */
static void first_stage(const saconv_job *job, int image, int r, float *xrow, ptrdiff_t xs, float *tmp,
                        float *dst, ptrdiff_t dst_stride) {
    const saconv_weights *wt = job->wt;
    const int w = wt->width, up = wt->upsample > 1 ? wt->upsample : 1;
    const int cin1 = wt->cin - wt->cin2, in_h = job->H / up, in_w = job->W / up;
    const ptrdiff_t in_hw = (ptrdiff_t)in_h * in_w;
    const float *src = job->x + ((ptrdiff_t)image * cin1 * in_hw) + (ptrdiff_t)(r / up) * in_w;
    ptrdiff_t src_stride = in_hw;
    if (wt->cin2 > 0 || wt->cin > 4) {
        for (int c = 0; c < cin1; c++) memcpy(xrow + c * xs, src + c * in_hw, in_w * sizeof(float));
        if (wt->cin2 > 0) {
            const float *src2 = job->x2 + ((ptrdiff_t)image * wt->cin2 * in_hw) + (ptrdiff_t)r * in_w;
            for (int c = 0; c < wt->cin2; c++)
                memcpy(xrow + (cin1 + c) * xs, src2 + c * in_hw, in_w * sizeof(float));
        }
        src = xrow;
        src_stride = xs;
    }
    if (up == 1) {
        pointwise(src, src_stride, wt->cin, wt->w1, wt->b1, dst, dst_stride, w, in_w);
        return;
    }
    pointwise(src, src_stride, wt->cin, wt->w1, wt->b1, tmp, in_w, w, in_w);
    for (int c = 0; c < w; c++) {
        const float *from = tmp + (ptrdiff_t)c * in_w;
        float *to = dst + c * dst_stride;
        for (int i = 0; i < in_w; i++)
            for (int j = 0; j < up; j++) to[i * up + j] = from[i];
    }
}

/* The cascade for the rows [r0, r1) of one image, streamed top to bottom: at step t, F_1 row t
 * is computed, then F_k row t - (k - 1) for k = 2..n, which needs F_{k-1} rows up to t - k + 2,
 * the one just computed. Each F_k (k < n) lives in a ring of three rows, so the working set is a
 * few rows and nothing is computed twice except the n - 1 halo rows at the chunk's ends. */
static void chunk_task(void *data, size_t task) {
    saconv_job *job = (saconv_job *)data;
    const saconv_weights *wt = job->wt;
    const int H = job->H, W = job->W, n = wt->n, w = wt->width, C = n * w, cin = wt->cin;
    const int image = (int)(task / (size_t)job->chunks), chunk = (int)(task % (size_t)job->chunks);
    const int r0 = chunk * job->chunk_rows;
    const int r1 = r0 + job->chunk_rows < H ? r0 + job->chunk_rows : H;
    const ptrdiff_t hw = (ptrdiff_t)H * W;
    const ptrdiff_t rs = W + 2;              /* ring row: zero, W values, zero */
    const ptrdiff_t ring = 3 * rs * w;       /* one stage's ring of three rows, all channels */
    const ptrdiff_t xs = (W + VLEN + 15) / 16 * 16 + VLEN; /* skewed row stride for the input copy */
    float *y = job->y + (ptrdiff_t)image * C * hw;
    double *sums = job->sums + (size_t)task * C;
    for (int c = 0; c < C; c++) sums[c] = 0.0;

    const size_t need = (size_t)(ring * (n > 1 ? n - 1 : 1) + rs + (ptrdiff_t)w * W * 2 + xs * cin);
    float *mem = get_scratch(need);
    if (!mem) {
        job->failed = 1;
        return;
    }
    float *rings = mem;                        /* stage k (1..n-1) at rings + (k-1) * ring */
    float *zero = rings + ring * (n > 1 ? n - 1 : 1) + 1;  /* a zero row for padding */
    float *tmp = zero - 1 + rs;                /* depthwise output of one row (w x W) */
    float *out = tmp + (ptrdiff_t)w * W;       /* last stage's output row (w x W) */
    float *xrow = out + (ptrdiff_t)w * W;      /* input row, channels xs apart */
    memset(zero - 1, 0, rs * sizeof(float));

    for (int t = r0 - (n - 1); t < r1 + (n - 1); t++) {
        for (int k = 1; k <= n; k++) {
            const int r = t - (k - 1);          /* the row of F_k computed at this step */
            if (r < r0 - (n - k) || r >= r1 + (n - k) || r < 0 || r >= H) continue;
            float *dst;
            ptrdiff_t dst_stride;
            if (k < n) {
                dst = rings + (k - 1) * ring + mod3(r) * rs + 1;
                dst_stride = 3 * rs;
            } else {
                dst = out;
                dst_stride = W;
            }
            if (k == 1) {
                first_stage(job, image, r, xrow, xs, tmp, dst, dst_stride);
            } else {
                const float *prev = rings + (k - 2) * ring + 1;
                const float *kern = wt->dw + (ptrdiff_t)(k - 2) * w * 9;
                const float *kb = wt->dwb + (ptrdiff_t)(k - 2) * w;
                const float *up = r - 1 >= 0 ? prev + mod3(r - 1) * rs : NULL;
                const float *mid = prev + mod3(r) * rs;
                const float *down = r + 1 < H ? prev + mod3(r + 1) * rs : NULL;
                for (int c = 0; c < w; c++) {
                    const ptrdiff_t off = (ptrdiff_t)c * 3 * rs;
                    depthwise_row(up ? up + off : zero, mid + off, down ? down + off : zero,
                                  kern + c * 9, kb[c], tmp + (ptrdiff_t)c * W, W);
                }
                pointwise(tmp, W, w, wt->pw + (ptrdiff_t)(k - 2) * w * w,
                          wt->pwb + (ptrdiff_t)(k - 2) * w, dst, dst_stride, w, W);
            }
            if (k < n)
                for (int c = 0; c < w; c++) dst[c * dst_stride - 1] = dst[c * dst_stride + W] = 0.0f;
            if (r >= r0 && r < r1)
                for (int c = 0; c < w; c++) {
                    const int channel = (k - 1) * w + c;
                    sums[channel] += copy_row_sum(y + channel * hw + (ptrdiff_t)r * W,
                                                  dst + c * dst_stride, W);
                }
        }
    }
}

/* y = relu(z * scale + shift) for one channel of one image, in place. */
static void activate_task(void *data, size_t task) {
    saconv_job *job = (saconv_job *)data;
    const int C = job->channels;
    const int c = (int)(task % (size_t)C);
    const ptrdiff_t hw = (ptrdiff_t)job->H * job->W;
    float *p = job->y + (ptrdiff_t)task * hw;
    const float s = job->scale[task], t = job->wt->bn_shift[c];
    const vfloat vs = vbroadcast(s), vt = vbroadcast(t), zero = vbroadcast(0.0f);
    ptrdiff_t i = 0;
    for (; i + VLEN <= hw; i += VLEN) {
        vfloat v = vload(p + i) * vs + vt;
        vstore(p + i, (vfloat)((vmask)v & ~(v <= zero))); /* max(v, 0), NaN kept as torch.relu does */
    }
    for (; i < hw; i++) {
        float v = p[i] * s + t;
        p[i] = v <= 0.0f ? 0.0f : v;
    }
}

int saconv_forward(const saconv_weights *wt, const float *x, const float *x2, float *y, int batch, int H,
                   int W, saconv_parallel_for parallel_for, void *pool) {
    const int C = wt->n * wt->width;
    int chunks = H / CHUNK_DIVISOR;
    chunks = chunks < 1 ? 1 : chunks > MAX_CHUNKS ? MAX_CHUNKS : chunks;
    const int chunk_rows = (H + chunks - 1) / chunks;
    chunks = (H + chunk_rows - 1) / chunk_rows;
    double *sums = (double *)malloc(sizeof(double) * (size_t)batch * chunks * C);
    float *scale = (float *)malloc(sizeof(float) * (size_t)batch * C);
    double *mean = (double *)malloc(sizeof(double) * (size_t)C);
    if (!sums || !scale || !mean) {
        free(sums), free(scale), free(mean);
        return -1;
    }
    saconv_job job = {wt, x, x2, y, H, W, chunks, chunk_rows, sums, 0, scale, C};
    parallel_for(pool, chunk_task, &job, (size_t)batch * chunks);

    const int half = wt->eca_k / 2;
    const int failed = job.failed;
    for (int b = 0; b < batch; b++) {
        for (int c = 0; c < C; c++) {
            double s = 0.0;
            for (int i = 0; i < chunks; i++) s += sums[((size_t)b * chunks + i) * C + c];
            mean[c] = s / ((double)H * W);
        }
        for (int c = 0; c < C; c++) { /* ECA: 1-D convolution across channels, zero padded */
            double a = 0.0;
            for (int j = 0; j < wt->eca_k; j++) {
                int src = c + j - half;
                if (src >= 0 && src < C) a += (double)wt->eca[j] * mean[src];
            }
            double gate = 1.0 / (1.0 + exp(-a));
            scale[(size_t)b * C + c] = (float)(gate * wt->bn_scale[c]);
        }
    }
    if (!failed) parallel_for(pool, activate_task, &job, (size_t)batch * C);
    free(sums), free(scale), free(mean);
    return failed ? -1 : 0;
}

/* For callers without a thread pool (tests, ctypes). */
void saconv_serial_for(void *pool, saconv_task fn, void *data, size_t count) {
    (void)pool;
    for (size_t i = 0; i < count; i++) fn(data, i);
}

/* Flat entry point for ctypes: same as saconv_forward, run serially. */
int saconv_forward_serial(int cin, int width, int n, int eca_k, const float *w1, const float *b1,
                          const float *dw, const float *dwb, const float *pw, const float *pwb,
                          const float *eca, const float *bn_scale, const float *bn_shift,
                          const float *x, float *y, int batch, int H, int W) {
    saconv_weights wt = {cin, width, n, eca_k, 0, 1, w1, b1, dw, dwb, pw, pwb, eca, bn_scale, bn_shift};
    return saconv_forward(&wt, x, NULL, y, batch, H, W, saconv_serial_for, NULL);
}
