/*
 * Compiled decoding and validation of the common soft-label update.
 *
 * dslo_edge/protocol.py calls decode for each update the trainer receives.
 * It reads payload format versions 1 and 2 with full labels, float32 or
 * float16 inputs and ASCII sample ids, and checks the update against the
 * student's input shape and class count. The Python decoder in protocol.py
 * stays the reference: for a payload this code does not read, or one that
 * fails any check, decode returns None, and the caller runs the Python code,
 * which raises the precise InvalidUpdate. tests/test_payload_decoder.py
 * compares the two on valid and damaged payloads.
 *
 * Every multi-byte field is read byte by byte as little-endian, so the code
 * does not depend on the host's byte order or on alignment.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#define FLAG_LOGITS 0x01
#define FLAG_HARD_LABELS 0x02
#define FLAG_TEMPERATURE 0x04
#define FLAG_TOP_K 0x08
#define FLAG_FLOAT16_INPUTS 0x10
#define MAX_TEACHER_VERSION_BYTES 64
#define MAX_INPUT_RANK 4
#define MAX_TEMPERATURE 100.0f
/* magic, version, flags, message id, round, timestamp, count, rank */
#define HEADER_BYTES 39
/* A row sum this close to the edge of the tolerance goes to the Python code,
 * whose summation order may round it to the other side. */
#define SUM_GUARD 1e-9

static uint32_t u16_at(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8;
}

static uint32_t u32_at(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}

static float f32_at(const unsigned char *p) {
    uint32_t bits = u32_at(p);
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static double f64_at(const unsigned char *p) {
    uint64_t bits = (uint64_t)u32_at(p) | (uint64_t)u32_at(p + 4) << 32;
    double value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* IEEE half to single precision, exact for every finite half. Returns 0 for
 * infinity and NaN, which the caller rejects. */
static int half_to_float(uint32_t half, float *out) {
    uint32_t sign = (half & 0x8000u) << 16;
    uint32_t exponent = (half >> 10) & 0x1fu;
    uint32_t mantissa = half & 0x3ffu;
    uint32_t bits;
    if (exponent == 0x1fu) {
        return 0;
    }
    if (exponent != 0) {
        bits = sign | (exponent + 112u) << 23 | mantissa << 13;
    } else if (mantissa == 0) {
        bits = sign;
    } else {
        /* A subnormal half is a normal float: shift the leading 1 out. */
        exponent = 113u;
        while ((mantissa & 0x400u) == 0) {
            mantissa <<= 1;
            exponent--;
        }
        bits = sign | exponent << 23 | (mantissa & 0x3ffu) << 13;
    }
    memcpy(out, &bits, sizeof bits);
    return 1;
}

typedef struct {
    Py_buffer view;
    int acquired;
} Output;

/* Take a writable C-contiguous buffer of exactly `size` bytes. Returns 0
 * when the object is not one, with no exception set. */
static int take_output(PyObject *object, Output *output, Py_ssize_t size) {
    if (PyObject_GetBuffer(object, &output->view,
                           PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) != 0) {
        PyErr_Clear();
        return 0;
    }
    output->acquired = 1;
    return output->view.len == size;
}

static void release_output(Output *output) {
    if (output->acquired) {
        PyBuffer_Release(&output->view);
        output->acquired = 0;
    }
}

/* Copy n float32 values and check that each is finite. When `peak` is not
 * NULL, it receives the largest magnitude (0 for n = 0). The loop has no
 * early exit or library call, so the compiler can vectorise it. Non-negative
 * floats sort as their bits do, so the peak is taken on the bits. */
static int copy_float32(const unsigned char *source, Py_ssize_t n, char *target,
                        float *peak) {
    uint32_t largest = 0, not_finite = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t bits = u32_at(source + 4 * i);
        uint32_t magnitude = bits & 0x7fffffffu;
        not_finite |= magnitude >= 0x7f800000u;
        largest = magnitude > largest ? magnitude : largest;
        memcpy(target + 4 * i, &bits, sizeof bits);
    }
    if (not_finite) {
        return 0;
    }
    if (peak != NULL) {
        memcpy(peak, &largest, sizeof largest);
    }
    return 1;
}

/* Copy and check n float16 values as float32, as copy_float32 does. A normal
 * half becomes a float by moving its bits and adding 112 to the exponent.
 * A second loop converts zeros and subnormal halves, only if there is one. */
static int copy_float16(const unsigned char *source, Py_ssize_t n, char *target,
                        float *peak) {
    uint32_t largest = 0, not_finite = 0, small = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t half = u16_at(source + 2 * i);
        uint32_t magnitude = half & 0x7fffu;
        not_finite |= magnitude >= 0x7c00u;
        small |= magnitude < 0x0400u;
        largest = magnitude > largest ? magnitude : largest;
        uint32_t bits = (half & 0x8000u) << 16 | (magnitude + (112u << 10)) << 13;
        memcpy(target + 4 * i, &bits, sizeof bits);
    }
    if (not_finite) {
        return 0;
    }
    for (Py_ssize_t i = 0; small && i < n; i++) {
        uint32_t half = u16_at(source + 2 * i);
        if ((half & 0x7fffu) < 0x0400u) {
            float value;
            half_to_float(half, &value);
            memcpy(target + 4 * i, &value, sizeof value);
        }
    }
    return half_to_float(largest, peak);
}

/* Check probability rows: no negative value, and a float64 sum within the
 * tolerance of 1 and not within SUM_GUARD of its edge. */
static int probability_rows(const char *labels, Py_ssize_t rows,
                            Py_ssize_t classes, double tolerance) {
    for (Py_ssize_t i = 0; i < rows; i++) {
        double sum = 0.0;
        for (Py_ssize_t k = 0; k < classes; k++) {
            float value;
            memcpy(&value, labels + 4 * (i * classes + k), sizeof value);
            if (value < 0.0f) {
                return 0;
            }
            sum += (double)value;
        }
        if (fabs(sum - 1.0) > tolerance - SUM_GUARD) {
            return 0;
        }
    }
    return 1;
}

static int hard_labels(const unsigned char *source, Py_ssize_t n,
                       Py_ssize_t classes, char *target) {
    for (Py_ssize_t i = 0; i < n; i++) {
        int32_t label = (int32_t)u32_at(source + 4 * i);
        if (label < -1 || label >= classes) {
            return 0;
        }
        memcpy(target + 4 * i, &label, sizeof label);
    }
    return 1;
}

/* Read n ASCII sample ids into a new list. Returns NULL with no exception
 * set for an id that is not ASCII or runs past `end`. */
static PyObject *ascii_ids(const unsigned char *data, Py_ssize_t *offset,
                           Py_ssize_t end, Py_ssize_t n) {
    PyObject *ids = PyList_New(n);
    if (ids == NULL) {
        return NULL;
    }
    Py_ssize_t at = *offset;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (at >= end) {
            goto unreadable;
        }
        Py_ssize_t length = data[at++];
        if (length > end - at) {
            goto unreadable;
        }
        for (Py_ssize_t j = 0; j < length; j++) {
            if (data[at + j] >= 0x80) {
                goto unreadable;
            }
        }
        PyObject *text = PyUnicode_DecodeASCII((const char *)data + at, length, NULL);
        if (text == NULL) {
            Py_DECREF(ids);
            return NULL;
        }
        PyList_SET_ITEM(ids, i, text);
        at += length;
    }
    *offset = at;
    return ids;
unreadable:
    Py_DECREF(ids);
    return NULL;
}

PyDoc_STRVAR(decode_doc,
"decode(payload, max_payload_bytes, max_samples, input_shape, class_count,\n"
"       sum_tolerance, inputs_out, labels_out, hard_out)\n"
"    -> (flags, message_id, teacher_round, timestamp, teacher_version,\n"
"        sample_ids, temperature, input_peak) or None\n\n"
"Decode a payload of format version 1 or 2 with full labels and ASCII\n"
"sample ids, check it against the model, and write its inputs as float32,\n"
"its labels and its hard labels to the three writable buffers, which must\n"
"have exactly the payload's sizes (hard_out is None without hard labels).\n"
"Returns None for any payload it does not read or that fails a check,\n"
"leaving the buffers in an undefined state. Sample ids are not checked for\n"
"repeats. input_peak is the largest input magnitude.");

static PyObject *decode(PyObject *self, PyObject *args) {
    Py_buffer payload;
    Py_ssize_t max_payload_bytes, max_samples, class_count;
    PyObject *shape, *inputs_object, *labels_object, *hard_object;
    double tolerance;
    if (!PyArg_ParseTuple(args, "y*nnO!ndOOO", &payload, &max_payload_bytes,
                          &max_samples, &PyTuple_Type, &shape, &class_count,
                          &tolerance, &inputs_object, &labels_object,
                          &hard_object)) {
        return NULL;
    }
    Output inputs_out = {0}, labels_out = {0}, hard_out = {0};
    PyObject *version_text = NULL, *ids = NULL, *result = NULL;
    const unsigned char *data = (const unsigned char *)payload.buf;
    Py_ssize_t size = payload.len;

    if (size > max_payload_bytes || size < HEADER_BYTES ||
        memcmp(data, "DSLO", 4) != 0 || (data[4] != 1 && data[4] != 2)) {
        goto fallback;
    }
    int version = data[4], flags = data[5];
    int known = FLAG_LOGITS | FLAG_HARD_LABELS | FLAG_TEMPERATURE;
    if (version == 2) {
        known |= FLAG_FLOAT16_INPUTS;
    }
    /* Top-k labels are left to the Python code. */
    if (flags & ~known) {
        goto fallback;
    }
    uint32_t teacher_round = u32_at(data + 22);
    double timestamp = f64_at(data + 26);
    int64_t count = (int64_t)u32_at(data + 34);
    Py_ssize_t rank = data[38];
    if (count < 1 || count > (int64_t)max_samples || rank < 1 ||
        rank > MAX_INPUT_RANK ||
        PyTuple_GET_SIZE(shape) != rank) {
        goto fallback;
    }
    Py_ssize_t offset = HEADER_BYTES;
    if (size - offset < 4 * rank + 7) {
        goto fallback;
    }
    /* Each input takes at least 2 bytes and each label 4, so larger
     * samples cannot fit in the payload. Stopping there keeps every product
     * below in the range of int64_t, also on 32-bit hosts. */
    int64_t per_sample = 1, largest = (int64_t)size / (2 * count);
    for (Py_ssize_t d = 0; d < rank; d++) {
        /* Any integer type, numpy's too. A value beyond Py_ssize_t is clipped
         * and then matches no dimension. */
        Py_ssize_t expected = PyNumber_AsSsize_t(PyTuple_GET_ITEM(shape, d), NULL);
        if (expected == -1 && PyErr_Occurred()) {
            goto error;
        }
        int64_t dim = (int64_t)u32_at(data + offset + 4 * d);
        if (dim < 1 || dim != (int64_t)expected || dim > largest) {
            goto fallback;
        }
        per_sample *= dim;
        if (per_sample > largest) {
            goto fallback;
        }
    }
    offset += 4 * rank;
    Py_ssize_t classes = (Py_ssize_t)u16_at(data + offset);
    float temperature = f32_at(data + offset + 2);
    offset += 6;
    if (classes < 2 || classes != class_count ||
        (int64_t)classes > (int64_t)size / (4 * count)) {
        goto fallback;
    }
    if (flags & FLAG_TEMPERATURE) {
        if (!isfinite(temperature) || !(temperature > 0.0f) ||
            temperature > MAX_TEMPERATURE) {
            goto fallback;
        }
    } else if (temperature != 0.0f) {
        goto fallback;
    }
    Py_ssize_t version_length = data[offset++];
    if (version_length > MAX_TEACHER_VERSION_BYTES ||
        version_length > size - offset) {
        goto fallback;
    }
    version_text = PyUnicode_DecodeUTF8((const char *)data + offset,
                                        version_length, "strict");
    if (version_text == NULL) {
        PyErr_Clear();
        goto fallback;
    }
    offset += version_length;

    /* Now 2 * input_count and 4 * label_count are at most size, and
     * count at most size / 8. */
    int half = (flags & FLAG_FLOAT16_INPUTS) != 0;
    int64_t input_count = count * per_sample;
    int64_t label_count = count * classes;
    int64_t array_bytes = (half ? 2 : 4) * input_count + 4 * label_count +
                          ((flags & FLAG_HARD_LABELS) ? 4 * count : 0);
    if (count + array_bytes > (int64_t)(size - offset)) {
        goto fallback;
    }
    ids = ascii_ids(data, &offset, size, (Py_ssize_t)count);
    if (ids == NULL) {
        if (PyErr_Occurred()) {
            goto error;
        }
        goto fallback;
    }
    /* With float16 inputs the float32 output is twice their payload bytes,
     * which can exceed Py_ssize_t on a 32-bit host. */
    if ((int64_t)(size - offset) != array_bytes ||
        input_count > (int64_t)(PY_SSIZE_T_MAX / 4)) {
        goto fallback;
    }
    if (!take_output(inputs_object, &inputs_out, (Py_ssize_t)(4 * input_count)) ||
        !take_output(labels_object, &labels_out, (Py_ssize_t)(4 * label_count))) {
        goto fallback;
    }
    if (flags & FLAG_HARD_LABELS) {
        if (!take_output(hard_object, &hard_out, (Py_ssize_t)(4 * count))) {
            goto fallback;
        }
    } else if (hard_object != Py_None) {
        goto fallback;
    }

    const unsigned char *arrays = data + offset;
    float input_peak = 0.0f;
    int ok = half ? copy_float16(arrays, input_count, inputs_out.view.buf,
                                 &input_peak)
                  : copy_float32(arrays, input_count, inputs_out.view.buf,
                                 &input_peak);
    arrays += (half ? 2 : 4) * input_count;
    ok = ok && copy_float32(arrays, label_count, labels_out.view.buf, NULL);
    arrays += 4 * label_count;
    if (ok && !(flags & FLAG_LOGITS)) {
        ok = probability_rows(labels_out.view.buf, count, classes, tolerance);
    }
    if (ok && (flags & FLAG_HARD_LABELS)) {
        ok = hard_labels(arrays, count, classes, hard_out.view.buf);
    }
    if (!ok) {
        goto fallback;
    }
    PyObject *temperature_object = Py_None;
    if (flags & FLAG_TEMPERATURE) {
        temperature_object = PyFloat_FromDouble((double)temperature);
        if (temperature_object == NULL) {
            goto error;
        }
    } else {
        Py_INCREF(Py_None);
    }
    result = Py_BuildValue("iy#kdNNNd", flags, (const char *)data + 6,
                           (Py_ssize_t)16, (unsigned long)teacher_round,
                           timestamp, version_text, ids, temperature_object,
                           (double)input_peak);
    version_text = NULL;
    ids = NULL;
    goto done;

fallback:
    result = Py_None;
    Py_INCREF(result);
    goto done;
error:
    result = NULL;
done:
    Py_XDECREF(version_text);
    Py_XDECREF(ids);
    release_output(&inputs_out);
    release_output(&labels_out);
    release_output(&hard_out);
    PyBuffer_Release(&payload);
    return result;
}

static PyMethodDef methods[] = {
    {"decode", decode, METH_VARARGS, decode_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_payload_decoder",
    "Compiled decoding and validation of the common soft-label update.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__payload_decoder(void) { return PyModule_Create(&module); }
