/* onnxruntime custom operator nerveseg::SAConv, running saconv_forward (saconv_kernel.c).
 *
 * Loaded with SessionOptions.register_custom_ops_library(path); ORT calls RegisterCustomOps.
 * Three operators in the domain "nerveseg", all float32:
 *   SAConv(x, weights...)         x (B, cin, H, W)            -> (B, n*w, H, W)
 *   SAConvUp2(x, weights...)      x (B, cin, H/2, W/2)        -> (B, n*w, H, W): SAConv(nearest x2 of x)
 *   SAConvCat(a, b, weights...)   a (B, ca, H, W), b (B, cb, H, W) -> SAConv(concat(a, b)), cin = ca + cb
 * weights: w1 (w, cin), b1 (w), dw (n-1, w, 9), dwb (n-1, w), pw (n-1, w, w), pwb (n-1, w),
 * eca (k), bn_scale (n*w), bn_shift (n*w).
 *
 * We talk to onnxruntime through its stable C ABI without its header (the wheel ships none):
 * the OrtApi table is an append-only array of function pointers, so each function we use is
 * named by its slot below (the same slots onnxruntime's own onnxruntime_c_api.cc asserts), and
 * OrtCustomOp is laid out field by field. Requires onnxruntime >= 1.17 (API 17: ParallelFor).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "saconv_kernel.h"

#define ORT_API_MIN 17 /* KernelContext_ParallelFor */

typedef void ort_status;
typedef void *const *ort_api; /* the OrtApi function table */
typedef struct {
    ort_api (*get_api)(uint32_t version);
    const char *(*get_version_string)(void);
} ort_api_base;

/* OrtApi slots (0-based) */
enum {
    SLOT_CREATE_STATUS = 0,
    SLOT_CREATE_CUSTOM_OP_DOMAIN = 26,
    SLOT_CUSTOM_OP_DOMAIN_ADD = 27,
    SLOT_ADD_CUSTOM_OP_DOMAIN = 28,
    SLOT_GET_TENSOR_MUTABLE_DATA = 51,
    SLOT_GET_TENSOR_ELEMENT_TYPE = 60,
    SLOT_GET_DIMENSIONS_COUNT = 61,
    SLOT_GET_DIMENSIONS = 62,
    SLOT_GET_TENSOR_TYPE_AND_SHAPE = 65,
    SLOT_KERNEL_CONTEXT_GET_INPUT = 90,
    SLOT_KERNEL_CONTEXT_GET_OUTPUT = 91,
    SLOT_RELEASE_STATUS = 93,
    SLOT_RELEASE_TENSOR_TYPE_AND_SHAPE_INFO = 99,
    SLOT_KERNEL_CONTEXT_PARALLEL_FOR = 274,
};

typedef ort_status *(*fn_create_status)(int code, const char *msg);
typedef ort_status *(*fn_create_domain)(const char *domain, void **out);
typedef ort_status *(*fn_domain_add)(void *domain, const void *op);
typedef ort_status *(*fn_add_domain)(void *options, void *domain);
typedef ort_status *(*fn_get_data)(void *value, void **out);
typedef ort_status *(*fn_element_type)(const void *info, int *out);
typedef ort_status *(*fn_dims_count)(const void *info, size_t *out);
typedef ort_status *(*fn_dims)(const void *info, int64_t *dims, size_t count);
typedef ort_status *(*fn_type_and_shape)(const void *value, void **out);
typedef ort_status *(*fn_get_input)(const void *context, size_t index, const void **out);
typedef ort_status *(*fn_get_output)(void *context, size_t index, const int64_t *dims, size_t count, void **out);
typedef void (*fn_release)(void *object);
typedef ort_status *(*fn_parallel_for)(const void *context, void (*fn)(void *, size_t), size_t total,
                                       size_t num_batch, void *data);

#define API(api, slot, type) ((type)(api)[slot])

enum { ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 };
enum { ELEMENT_FLOAT = 1 };
enum { WEIGHTS = 9, MAX_INPUTS = 11 };
enum { MODE_PLAIN = 0, MODE_UP2 = 1, MODE_CAT = 2 };

/* struct OrtCustomOp: a uint32 version, then 25 function pointers */
typedef struct {
    uint32_t version;
    void *create_kernel, *get_name, *get_execution_provider_type, *get_input_type,
        *get_input_type_count, *get_output_type, *get_output_type_count, *kernel_compute,
        *kernel_destroy, *get_input_characteristic, *get_output_characteristic,
        *get_input_memory_type, *get_variadic_input_min_arity, *get_variadic_input_homogeneity,
        *get_variadic_output_min_arity, *get_variadic_output_homogeneity, *create_kernel_v2,
        *kernel_compute_v2, *infer_output_shape, *get_start_version, *get_end_version,
        *get_may_inplace, *release_may_inplace, *get_alias_map, *release_alias_map;
} ort_custom_op;
_Static_assert(sizeof(ort_custom_op) == 208, "OrtCustomOp layout");

static ort_api g_api = NULL;

typedef struct {
    const float *data;
    int64_t dims[4];
    size_t rank;
    int64_t size;
} tensor_view;

static ort_status *fail(int code, const char *msg) { return API(g_api, SLOT_CREATE_STATUS, fn_create_status)(code, msg); }

static ort_status *read_input(const void *context, size_t index, tensor_view *out) {
    const void *value = NULL;
    void *info = NULL, *data = NULL;
    ort_status *status;
    if ((status = API(g_api, SLOT_KERNEL_CONTEXT_GET_INPUT, fn_get_input)(context, index, &value))) return status;
    if (!value) return fail(ORT_INVALID_ARGUMENT, "nerveseg.SAConv: missing input");
    if ((status = API(g_api, SLOT_GET_TENSOR_TYPE_AND_SHAPE, fn_type_and_shape)(value, &info))) return status;
    int type = 0;
    status = API(g_api, SLOT_GET_TENSOR_ELEMENT_TYPE, fn_element_type)(info, &type);
    if (!status) status = API(g_api, SLOT_GET_DIMENSIONS_COUNT, fn_dims_count)(info, &out->rank);
    if (!status && out->rank > 4) status = fail(ORT_INVALID_ARGUMENT, "nerveseg.SAConv: input of rank > 4");
    if (!status) status = API(g_api, SLOT_GET_DIMENSIONS, fn_dims)(info, out->dims, out->rank);
    API(g_api, SLOT_RELEASE_TENSOR_TYPE_AND_SHAPE_INFO, fn_release)(info);
    if (status) return status;
    if (type != ELEMENT_FLOAT) return fail(ORT_INVALID_ARGUMENT, "nerveseg.SAConv: inputs must be float32");
    out->size = 1;
    for (size_t i = 0; i < out->rank; i++) out->size *= out->dims[i];
    if ((status = API(g_api, SLOT_GET_TENSOR_MUTABLE_DATA, fn_get_data)((void *)value, &data))) return status;
    out->data = (const float *)data;
    return NULL;
}

static int shape_is(const tensor_view *t, size_t rank, int64_t d0, int64_t d1, int64_t d2) {
    const int64_t want[3] = {d0, d1, d2};
    if (t->rank != rank) return 0;
    for (size_t i = 0; i < rank; i++)
        if (t->dims[i] != want[i]) return 0;
    return 1;
}

typedef struct {
    const void *context;
    int serial; /* ParallelFor failed once: run serially from then on */
} pool_handle;

static void ort_parallel_for(void *pool, saconv_task fn, void *data, size_t count) {
    pool_handle *handle = (pool_handle *)pool;
    if (!handle->serial) {
        ort_status *status = API(g_api, SLOT_KERNEL_CONTEXT_PARALLEL_FOR, fn_parallel_for)(handle->context, fn, count, 0, data);
        if (!status) return;
        API(g_api, SLOT_RELEASE_STATUS, fn_release)(status);
        handle->serial = 1;
    }
    for (size_t i = 0; i < count; i++) fn(data, i);
}

static ort_status *compute_mode(int mode, void *context) {
    const size_t n_in = mode == MODE_CAT ? 2 : 1;
    tensor_view in[MAX_INPUTS];
    ort_status *status;
    for (size_t i = 0; i < n_in + WEIGHTS; i++)
        if ((status = read_input(context, i, &in[i]))) return status;
    const tensor_view *x = &in[0], *x2 = mode == MODE_CAT ? &in[1] : NULL, *wts = &in[n_in];
    const tensor_view *w1 = &wts[0];
    if (x->rank != 4 || (x2 && (x2->rank != 4 || x2->dims[0] != x->dims[0] || x2->dims[2] != x->dims[2] ||
                                x2->dims[3] != x->dims[3])))
        return fail(ORT_INVALID_ARGUMENT, "nerveseg.SAConv: x must be (B, cin, H, W) (both inputs of SAConvCat the same B, H, W)");
    const int64_t cin2 = x2 ? x2->dims[1] : 0, cin = x->dims[1] + cin2;
    if (w1->rank != 2 || w1->dims[1] != cin)
        return fail(ORT_INVALID_ARGUMENT, "nerveseg.SAConv: x must be (B, cin, H, W) and w1 (w, cin)");
    const int64_t width = w1->dims[0], stages = wts[2].rank == 3 ? wts[2].dims[0] : -1, k = wts[6].size;
    const int64_t channels = (stages + 1) * width;
    if (!shape_is(&wts[1], 1, width, 0, 0) || !shape_is(&wts[2], 3, stages, width, 9) ||
        !shape_is(&wts[3], 2, stages, width, 0) || !shape_is(&wts[4], 3, stages, width, width) ||
        !shape_is(&wts[5], 2, stages, width, 0) || wts[6].rank != 1 || k % 2 != 1 ||
        !shape_is(&wts[7], 1, channels, 0, 0) || !shape_is(&wts[8], 1, channels, 0, 0))
        return fail(ORT_INVALID_ARGUMENT, "nerveseg.SAConv: weight shapes do not fit together");
    const int up = mode == MODE_UP2 ? 2 : 1;
    const int64_t H = x->dims[2] * up, W = x->dims[3] * up;
    if (x->dims[0] > INT32_MAX || H > INT32_MAX || W > INT32_MAX || cin > INT32_MAX)
        return fail(ORT_INVALID_ARGUMENT, "nerveseg.SAConv: input too large");
    const int64_t out_dims[4] = {x->dims[0], channels, H, W};
    void *output = NULL, *out_data = NULL;
    if ((status = API(g_api, SLOT_KERNEL_CONTEXT_GET_OUTPUT, fn_get_output)(context, 0, out_dims, 4, &output))) return status;
    if ((status = API(g_api, SLOT_GET_TENSOR_MUTABLE_DATA, fn_get_data)(output, &out_data))) return status;
    if (x->dims[0] * channels * H * W == 0) return NULL;
    saconv_weights wt = {(int)cin, (int)width, (int)(stages + 1), (int)k, (int)cin2, up, w1->data, wts[1].data,
                         wts[2].data, wts[3].data, wts[4].data, wts[5].data, wts[6].data, wts[7].data, wts[8].data};
    pool_handle pool = {context, 0};
    if (saconv_forward(&wt, x->data, x2 ? x2->data : NULL, (float *)out_data, (int)x->dims[0], (int)H, (int)W,
                       ort_parallel_for, &pool))
        return fail(ORT_FAIL, "nerveseg.SAConv: out of memory");
    return NULL;
}

/* OrtCustomOp callbacks. Each operator is an op_def; its kernel is the op_def itself (the
 * operators are stateless: weights arrive as inputs on every call). */
typedef struct {
    ort_custom_op base; /* first member: ORT's const OrtCustomOp* is a pointer to the op_def */
    int mode;
    const char *name;
} op_def;

static op_def g_ops[3];

static ort_status *compute(void *kernel, void *context) { return compute_mode(((op_def *)kernel)->mode, context); }
static ort_status *create_kernel_v2(const void *op, const void *api, const void *info, void **kernel) {
    (void)api, (void)info;
    *kernel = (void *)op;
    return NULL;
}
static void *create_kernel(const void *op, const void *api, const void *info) {
    (void)api, (void)info;
    return (void *)op;
}
static void kernel_compute(void *kernel, void *context) { /* V1 entry, unused from ORT 1.16 on */
    ort_status *status = compute(kernel, context);
    if (status) API(g_api, SLOT_RELEASE_STATUS, fn_release)(status);
}
static void kernel_destroy(void *kernel) { (void)kernel; }
static const char *get_name(const void *op) { return ((const op_def *)op)->name; }
static const char *get_ep(const void *op) { (void)op; return NULL; /* CPU */ }
static int get_type(const void *op, size_t index) { (void)op, (void)index; return ELEMENT_FLOAT; }
static size_t get_input_count(const void *op) { return WEIGHTS + (((const op_def *)op)->mode == MODE_CAT ? 2 : 1); }
static size_t get_output_count(const void *op) { (void)op; return 1; }
static int get_characteristic(const void *op, size_t index) { (void)op, (void)index; return 0; /* required */ }
static int get_memory_type(const void *op, size_t index) { (void)op, (void)index; return 0; /* default */ }

/* Version of this library's operator contract, checked by nerveseg before loading it. */
int nerveseg_saconv_abi(void) { return 2; }

ort_status *RegisterCustomOps(void *options, const ort_api_base *base) {
    g_api = base->get_api(ORT_API_MIN);
    if (!g_api) {
        /* API 1 always exists and is enough to report the problem */
        ort_api api1 = base->get_api(1);
        char msg[160];
        snprintf(msg, sizeof msg, "nerveseg.SAConv needs onnxruntime >= 1.17, this is %s", base->get_version_string());
        return API(api1, SLOT_CREATE_STATUS, fn_create_status)(ORT_FAIL, msg);
    }
    static const char *names[3] = {"SAConv", "SAConvUp2", "SAConvCat"};
    void *domain = NULL;
    ort_status *status = API(g_api, SLOT_CREATE_CUSTOM_OP_DOMAIN, fn_create_domain)("nerveseg", &domain);
    for (int i = 0; i < 3 && !status; i++) {
        ort_custom_op *op = &g_ops[i].base;
        memset(&g_ops[i], 0, sizeof g_ops[i]);
        g_ops[i].mode = i;
        g_ops[i].name = names[i];
        op->version = ORT_API_MIN;
        op->create_kernel = (void *)create_kernel;
        op->get_name = (void *)get_name;
        op->get_execution_provider_type = (void *)get_ep;
        op->get_input_type = (void *)get_type;
        op->get_input_type_count = (void *)get_input_count;
        op->get_output_type = (void *)get_type;
        op->get_output_type_count = (void *)get_output_count;
        op->kernel_compute = (void *)kernel_compute;
        op->kernel_destroy = (void *)kernel_destroy;
        op->get_input_characteristic = (void *)get_characteristic;
        op->get_output_characteristic = (void *)get_characteristic;
        op->get_input_memory_type = (void *)get_memory_type;
        op->create_kernel_v2 = (void *)create_kernel_v2;
        op->kernel_compute_v2 = (void *)compute;
        status = API(g_api, SLOT_CUSTOM_OP_DOMAIN_ADD, fn_domain_add)(domain, op);
    }
    if (!status) status = API(g_api, SLOT_ADD_CUSTOM_OP_DOMAIN, fn_add_domain)(options, domain);
    /* the domain must outlive every session that uses it, so it is never released */
    return status;
}
