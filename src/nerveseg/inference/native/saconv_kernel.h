/* Fused SAConv forward pass (float32, NCHW) -- the kernel behind nerveseg's onnxruntime custom op.
 *
 * One SAConv (Kim et al. 2022, Fig. 2) is, per image,
 *   F_1 = W_1 x + b_1                               (1x1 convolution, cin -> w channels)
 *   F_k = P_k (D_k F_{k-1} + d_k) + p_k, k = 2..n   (depthwise 3x3, zero padding, then 1x1)
 *   z   = concat(F_1 .. F_n)                        (C = n * w channels)
 *   y   = relu(z * sigmoid(conv1d_k(mean_hw(z))) * bn_scale + bn_shift)
 * onnxruntime runs that as ~15 separate operators, each a full pass over memory. This kernel
 * computes the cascade in bands of rows that stay in the core's cache (with a halo of n-1 rows
 * for the three 3x3 stages), writes z once while summing it for the channel means, and then
 * applies gate, BatchNorm and ReLU in one pass over z.
 */
#ifndef NERVESEG_SACONV_KERNEL_H
#define NERVESEG_SACONV_KERNEL_H

#include <stddef.h>

typedef struct {
    int cin, width, n, eca_k;
    /* Input variants, so that the decoder's nearest x2 upsampling and skip concatenation need
     * no pass of their own: with cin2 > 0 the input is concat(x, x2) along channels (x has
     * cin - cin2 channels, x2 has cin2); with upsample = 2 the input is x upsampled x2 by
     * nearest neighbour (x is (batch, cin, H/2, W/2)). Not both. */
    int cin2, upsample;
    const float *w1, *b1;   /* (width, cin), (width) */
    const float *dw, *dwb;  /* (n-1, width, 3, 3), (n-1, width) */
    const float *pw, *pwb;  /* (n-1, width, width), (n-1, width) */
    const float *eca;       /* (eca_k) cross-channel 1-D kernel, no bias */
    const float *bn_scale;  /* (n*width) gamma / sqrt(var + eps) */
    const float *bn_shift;  /* (n*width) beta - mean * bn_scale */
} saconv_weights;

/* Runs fn(data, i) for i in [0, count); the caller decides how (serially, or on a thread pool). */
typedef void (*saconv_task)(void *data, size_t i);
typedef void (*saconv_parallel_for)(void *pool, saconv_task fn, void *data, size_t count);

/* y (batch, n*width, H, W) from x (batch, cin, H, W) (see cin2 and upsample for x2 and the
 * input's size). Returns 0, or -1 if memory ran out. */
int saconv_forward(const saconv_weights *wt, const float *x, const float *x2, float *y, int batch, int H,
                   int W, saconv_parallel_for parallel_for, void *pool);

#endif
