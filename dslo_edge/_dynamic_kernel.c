/*
 * Compiled per-row loops of the dynamic part: sample id lookups, entropy,
 * teacher monitor, smoothing, alpha and hard labels.
 *
 * dslo_edge/dynamic_compiled.py calls prepare and decides which batches take
 * this path, and dslo_edge/lru_rows.py calls lookup. The numpy code in
 * dslo_edge/softlabels.py stays the reference. Each loop here does the
 * arithmetic that numpy 2 does on the same values, one row at a time, and
 * tests/test_dynamic_kernel.py compares the two.
 *
 * Arrays arrive through the buffer protocol, so the module does not depend on
 * the numpy C API and works with numpy 1 and 2 alike.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Added inside the log of KL's second argument, as KL_EPSILON in softlabels.py. */
#define KL_EPSILON 1e-12
/* Batches up to this size use stack memory for their row indices. */
#define STACK_ROWS 256

typedef struct {
    Py_buffer view;
    int acquired;
} Array;

static void release(Array *arrays, int count) {
    for (int i = 0; i < count; i++) {
        if (arrays[i].acquired) {
            PyBuffer_Release(&arrays[i].view);
            arrays[i].acquired = 0;
        }
    }
}

/* Take a C-contiguous buffer of one of the formats in `formats`, with `ndim`
 * dimensions and items of `itemsize` bytes. */
static int take(PyObject *object, Array *array, const char *name,
                const char *formats, Py_ssize_t itemsize, int ndim,
                int writable) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(object, &array->view, flags) != 0) {
        PyErr_Format(PyExc_TypeError,
                     "%s must be a C-contiguous%s array", name,
                     writable ? " writable" : "");
        return -1;
    }
    array->acquired = 1;
    const char *format = array->view.format ? array->view.format : "B";
    if (format[0] == '<' || format[0] == '=' || format[0] == '@') {
        format++;
    }
    if (itemsize == 0) {
        itemsize = format[0] == 'f' ? 4 : 8;
    }
    if (array->view.ndim != ndim || array->view.itemsize != itemsize ||
        strlen(format) != 1 || strchr(formats, format[0]) == NULL ||
        (uintptr_t)array->view.buf % (uintptr_t)itemsize != 0) {
        PyErr_Format(PyExc_TypeError,
                     "%s must have %d dimension(s) of aligned items '%s' with "
                     "%zd bytes, got %d dimension(s) of '%s' with %zd bytes",
                     name, ndim, formats, itemsize, array->view.ndim, format,
                     array->view.itemsize);
        return -1;
    }
    return 0;
}

/* Teacher probabilities: float32 or float64 of shape (N, K). */
static int take_probabilities(PyObject *object, Array *array) {
    if (take(object, array, "p", "fd", 0, 2, 0) != 0) {
        return -1;
    }
    return 0;
}

static int same_rows(Array *array, Py_ssize_t rows, const char *name) {
    if (array->view.shape[0] != rows) {
        PyErr_Format(PyExc_ValueError, "%s has %zd rows, expected %zd", name,
                     array->view.shape[0], rows);
        return -1;
    }
    return 0;
}

static int positions_in_range(const int64_t *positions, Py_ssize_t count,
                              Py_ssize_t capacity) {
    for (Py_ssize_t i = 0; i < count; i++) {
        if (positions[i] < 0 || positions[i] >= capacity) {
            PyErr_Format(PyExc_ValueError,
                         "row position %lld of sample %zd is outside [0, %zd)",
                         (long long)positions[i], i, capacity);
            return -1;
        }
    }
    return 0;
}

/* Read one teacher probability, stored as float32 or float64, as float64. */
static inline double value_at(const Array *p, Py_ssize_t index) {
    if (p->view.itemsize == 4) {
        return (double)((const float *)p->view.buf)[index];
    }
    return ((const double *)p->view.buf)[index];
}

/* Write the row of each id in `index` to `positions`, or -1 for an absent id.
 * Return the number of absent ids, or -1 with an exception set. A row outside
 * [0, capacity) is an error. */
static Py_ssize_t find_rows(PyObject *index, PyObject *const *ids,
                            Py_ssize_t count, Py_ssize_t capacity,
                            int64_t *positions) {
    Py_ssize_t missing = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *row = PyDict_GetItemWithError(index, ids[i]);
        if (row == NULL) {
            if (PyErr_Occurred()) {
                return -1;
            }
            positions[i] = -1;
            missing++;
            continue;
        }
        long long value = PyLong_AsLongLong(row);
        if (value == -1 && PyErr_Occurred()) {
            return -1;
        }
        if (value < 0 || value >= capacity) {
            PyErr_Format(PyExc_ValueError,
                         "the index maps sample %zd to row %lld, outside [0, %zd)",
                         i, value, capacity);
            return -1;
        }
        positions[i] = value;
    }
    return missing;
}

PyDoc_STRVAR(lookup_doc,
"lookup(index, ids, out) -> int\n\n"
"Write index[ids[i]] to out[i] (int64), or -1 for an absent id; return the\n"
"number of absent ids.");

static PyObject *lookup(PyObject *self, PyObject *args) {
    PyObject *index, *ids, *out_object;
    if (!PyArg_ParseTuple(args, "O!OO", &PyDict_Type, &index, &ids, &out_object)) {
        return NULL;
    }
    /* A tuple copy owns a reference to each id, so an id's __hash__ or
     * __eq__ cannot free the others while the lookups run. */
    PyObject *sequence = PySequence_Tuple(ids);
    if (sequence == NULL) {
        return NULL;
    }
    Array out = {0};
    Py_ssize_t count = PyTuple_GET_SIZE(sequence);
    Py_ssize_t missing = 0;
    if (take(out_object, &out, "out", "lq", 8, 1, 1) != 0 ||
        same_rows(&out, count, "out") != 0) {
        goto fail;
    }
    missing = find_rows(index, &PyTuple_GET_ITEM(sequence, 0), count,
                        PY_SSIZE_T_MAX, (int64_t *)out.view.buf);
    if (missing < 0) {
        goto fail;
    }
    release(&out, 1);
    Py_DECREF(sequence);
    return PyLong_FromSsize_t(missing);
fail:
    release(&out, 1);
    Py_DECREF(sequence);
    return NULL;
}

/* The tables of one store: the row array, the stamp of each row and, for the
 * monitor, the teacher round of each row. */
typedef struct {
    PyObject *index;
    Array rows, last_used, rounds;
    Py_ssize_t capacity;
} Table;

static int take_table(PyObject *tuple, Table *table, const char *name,
                      int with_rounds, Py_ssize_t classes) {
    PyObject *index, *rows, *last_used, *rounds = NULL;
    if (!PyTuple_Check(tuple)) {
        PyErr_Format(PyExc_TypeError, "%s must be a tuple", name);
        return -1;
    }
    int parsed = with_rounds
        ? PyArg_ParseTuple(tuple, "O!OOO", &PyDict_Type, &index, &rows,
                           &last_used, &rounds)
        : PyArg_ParseTuple(tuple, "O!OO", &PyDict_Type, &index, &rows,
                           &last_used);
    if (!parsed) {
        return -1;
    }
    table->index = index;
    if (take(rows, &table->rows, "rows", "f", 4, 2, 1) != 0 ||
        take(last_used, &table->last_used, "last_used", "lq", 8, 1, 1) != 0 ||
        (with_rounds &&
         take(rounds, &table->rounds, "rounds", "lq", 8, 1, 1) != 0)) {
        return -1;
    }
    table->capacity = table->rows.view.shape[0];
    if (table->rows.view.shape[1] != classes) {
        PyErr_Format(PyExc_ValueError, "the %s rows have %zd classes, p has %zd",
                     name, table->rows.view.shape[1], classes);
        return -1;
    }
    if (same_rows(&table->last_used, table->capacity, "last_used") != 0 ||
        (with_rounds &&
         same_rows(&table->rounds, table->capacity, "rounds") != 0)) {
        return -1;
    }
    return 0;
}

static void release_table(Table *table) {
    release(&table->rows, 1);
    release(&table->last_used, 1);
    release(&table->rounds, 1);
}

static int compare_rows(const void *left, const void *right) {
    int64_t a = *(const int64_t *)left, b = *(const int64_t *)right;
    return (a > b) - (a < b);
}

/* Check whether a row index occurs twice, that is, whether an id repeats in
 * the batch. `spare` has room for `count` values. */
static int has_repeats(const int64_t *rows, Py_ssize_t count, int64_t *spare) {
    if (count <= 64) {
        for (Py_ssize_t i = 1; i < count; i++) {
            for (Py_ssize_t j = 0; j < i; j++) {
                if (rows[i] == rows[j]) {
                    return 1;
                }
            }
        }
        return 0;
    }
    memcpy(spare, rows, (size_t)count * sizeof(int64_t));
    qsort(spare, (size_t)count, sizeof(int64_t), compare_rows);
    for (Py_ssize_t i = 1; i < count; i++) {
        if (spare[i] == spare[i - 1]) {
            return 1;
        }
    }
    return 0;
}

/* Take the (known, positions) pair of one table from the caller's lookup. */
static int take_given(PyObject *known_object, PyObject *positions_object,
                      Array *known, Array *positions, Py_ssize_t count,
                      Py_ssize_t capacity) {
    if (take(known_object, known, "known", "lq", 8, 1, 0) != 0 ||
        take(positions_object, positions, "positions", "lq", 8, 1, 0) != 0 ||
        same_rows(known, count, "known") != 0 ||
        same_rows(positions, count, "positions") != 0) {
        return -1;
    }
    return positions_in_range((const int64_t *)positions->view.buf, count,
                              capacity);
}

typedef struct {
    double entropy_sum, confidence_sum, drift_sum;
    Py_ssize_t drift_count;
} MonitorSums;

/* Write each row's entropy to `entropy`, sum the monitor's statistics and
 * drift, and store the rows in the monitor. */
static MonitorSums observe_rows(const Array *p, const int64_t *known,
                                const int64_t *where, Table *monitor,
                                long long first_stamp, long long teacher_round,
                                double entropy_scale, double *entropy) {
    Py_ssize_t count = p->view.shape[0], classes = p->view.shape[1];
    float *table = (float *)monitor->rows.view.buf;
    int64_t *stored_round = (int64_t *)monitor->rounds.view.buf;
    int64_t *stamps = (int64_t *)monitor->last_used.view.buf;
    MonitorSums sums = {0.0, 0.0, 0.0, 0};
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_ssize_t first = i * classes;
        float *stored = table + where[i] * classes;
        double sum_p_log_p = 0.0, top = -INFINITY;
        for (Py_ssize_t k = 0; k < classes; k++) {
            double value = value_at(p, first + k);
            sum_p_log_p += value * log(value > DBL_MIN ? value : DBL_MIN);
            top = value > top ? value : top;
        }
        entropy[i] = sum_p_log_p * entropy_scale;
        sums.entropy_sum += entropy[i];
        sums.confidence_sum += top;
        int64_t previous_round = known[i] >= 0 ? stored_round[where[i]] : -1;
        if (known[i] >= 0 && previous_round < teacher_round) {
            double cross = 0.0;
            for (Py_ssize_t k = 0; k < classes; k++) {
                cross += value_at(p, first + k) *
                         log((double)stored[k] + KL_EPSILON);
            }
            sums.drift_sum += sum_p_log_p - cross;
            sums.drift_count++;
        }
        if (previous_round <= teacher_round) {
            for (Py_ssize_t k = 0; k < classes; k++) {
                stored[k] = (float)value_at(p, first + k);
            }
            stored_round[where[i]] = teacher_round;
            stamps[where[i]] = first_stamp + i;
        }
    }
    return sums;
}

/* Write the smoothed targets to `soft` and to the store. */
static void smooth_rows(const Array *p, const int64_t *known,
                        const int64_t *where, Table *store,
                        long long first_stamp, double lam, float *soft) {
    Py_ssize_t count = p->view.shape[0], classes = p->view.shape[1];
    float *table = (float *)store->rows.view.buf;
    int64_t *stamps = (int64_t *)store->last_used.view.buf;
    double scale = 1.0 / (1.0 + lam);
    float lam_float = (float)lam;
    for (Py_ssize_t i = 0; i < count; i++) {
        float *stored = table + where[i] * classes;
        float *target = soft + i * classes;
        int mix = known[i] >= 0 && lam > 0;
        for (Py_ssize_t k = 0; k < classes; k++) {
            double value = value_at(p, i * classes + k);
            if (mix) {
                /* numpy multiplies a Python float and a float32 array in
                 * float32, and adds that to the float64 rows. */
                float weighted = lam_float * stored[k];
                value = (value + (double)weighted) * scale;
            }
            target[k] = (float)value;
        }
        memcpy(stored, target, (size_t)classes * sizeof(float));
        stamps[where[i]] = first_stamp + i;
    }
}

/* Write alpha from each row's entropy, clipped to [low, high], and the hard
 * labels, with the argmax or -1 where a row has none. */
static void alpha_and_labels(const double *entropy, const float *soft,
                             Py_ssize_t count, Py_ssize_t classes,
                             const double coefficients[4], const int32_t *given,
                             int argmax, float *alpha, int32_t *labels) {
    double offset = coefficients[0], slope = coefficients[1];
    double low = coefficients[2], high = coefficients[3];
    for (Py_ssize_t i = 0; i < count; i++) {
        double value = offset - slope * entropy[i];
        value = value > low ? value : low;
        value = value < high ? value : high;
        alpha[i] = (float)value;
        if (given != NULL && given[i] >= 0) {
            labels[i] = given[i];
        } else if (argmax) {
            const float *row = soft + i * classes;
            Py_ssize_t best = 0;
            for (Py_ssize_t k = 1; k < classes; k++) {
                best = row[k] > row[best] ? k : best;
            }
            labels[i] = (int32_t)best;
        } else {
            labels[i] = given != NULL ? given[i] : -1;
        }
    }
}

PyDoc_STRVAR(prepare_doc,
"prepare(ids, p, monitor, store, given, stamps, teacher_round, fixed,\n"
"        boost_remaining, alpha, hard, soft_out, alpha_out, hard_out)\n"
"    -> (entropy_sum, confidence_sum, drift_sum, drift_count, lam, spike)\n"
"    or None\n\n"
"The dynamic part of one batch with unique ids, as SoftLabelEngine.prepare\n"
"computes it in numpy.\n\n"
"monitor is (index, rows, last_used, rounds) and store (index, rows,\n"
"last_used) of the two LRU tables. given is None, to look the ids up here\n"
"and return None, with nothing changed, if a table lacks one; or\n"
"(monitor_known, monitor_positions, store_known, store_positions) after the\n"
"caller gave new ids rows (known is -1 for those). None is also returned\n"
"for an id that repeats in the batch. stamps is the first\n"
"stamp of each table. fixed is (entropy_scale, lambda, boost_lambda,\n"
"threshold, boost_updates, boost_min_rows, argmax), the arguments that only\n"
"the settings and the class count decide, and alpha is (offset, slope, low,\n"
"high). The boost starts when the batch drift exceeds threshold over at\n"
"least min(boost_min_rows, rows of the batch) rows with drift. hard is None\n"
"or int32 labels with -1 for none; argmax labels the rows without one.");

static PyObject *prepare(PyObject *self, PyObject *args) {
    PyObject *ids, *p_object, *monitor_tuple, *store_tuple, *given_object;
    PyObject *hard_object, *soft_object, *alpha_object, *labels_object;
    long long monitor_stamp, store_stamp, teacher_round, boost_remaining,
        boost_updates, boost_min_rows;
    double entropy_scale, lam, boost_lambda, threshold, coefficients[4];
    int argmax;
    if (!PyArg_ParseTuple(args, "O!OOOO(LL)L(ddddLLp)L(dddd)OOOO", &PyList_Type,
                          &ids, &p_object, &monitor_tuple, &store_tuple,
                          &given_object, &monitor_stamp, &store_stamp,
                          &teacher_round, &entropy_scale, &lam, &boost_lambda,
                          &threshold, &boost_updates, &boost_min_rows, &argmax,
                          &boost_remaining,
                          &coefficients[0], &coefficients[1], &coefficients[2],
                          &coefficients[3], &hard_object, &soft_object,
                          &alpha_object, &labels_object)) {
        return NULL;
    }
    Table monitor, store;
    memset(&monitor, 0, sizeof monitor);
    memset(&store, 0, sizeof store);
    Array a[9];
    memset(a, 0, sizeof a);
    Array *p = &a[0], *soft = &a[1], *alpha = &a[2], *labels = &a[3], *hard = &a[4];
    int64_t stack_scratch[3 * STACK_ROWS], *scratch = NULL;
    double stack_entropy[STACK_ROWS], *entropy = NULL;
    PyObject *result = NULL, *id_tuple = NULL;
    Py_ssize_t count = PyList_GET_SIZE(ids);

    if (take_probabilities(p_object, p) != 0) {
        goto done;
    }
    Py_ssize_t classes = p->view.shape[1];
    if (same_rows(p, count, "p") != 0 ||
        take_table(monitor_tuple, &monitor, "monitor", 1, classes) != 0 ||
        take_table(store_tuple, &store, "store", 0, classes) != 0 ||
        take(soft_object, soft, "soft_out", "f", 4, 2, 1) != 0 ||
        take(alpha_object, alpha, "alpha_out", "f", 4, 1, 1) != 0 ||
        take(labels_object, labels, "hard_out", "i", 4, 1, 1) != 0 ||
        (hard_object != Py_None &&
         take(hard_object, hard, "hard", "i", 4, 1, 0) != 0) ||
        same_rows(soft, count, "soft_out") != 0 ||
        same_rows(alpha, count, "alpha_out") != 0 ||
        same_rows(labels, count, "hard_out") != 0 ||
        (hard->acquired && same_rows(hard, count, "hard") != 0)) {
        goto done;
    }
    if (soft->view.shape[1] != classes) {
        PyErr_Format(PyExc_ValueError, "soft_out must have the %zd classes of p",
                     classes);
        goto done;
    }

    if (count <= STACK_ROWS) {
        scratch = stack_scratch;
        entropy = stack_entropy;
    } else {
        scratch = PyMem_Malloc((size_t)count * 3 * sizeof(int64_t));
        entropy = PyMem_Malloc((size_t)count * sizeof(double));
        if (scratch == NULL || entropy == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }

    const int64_t *monitor_known, *monitor_rows, *store_known, *store_rows;
    if (given_object == Py_None) {
        /* As in lookup: the tuple keeps every id alive during the lookups. */
        id_tuple = PyList_AsTuple(ids);
        if (id_tuple == NULL) {
            goto done;
        }
        if (PyTuple_GET_SIZE(id_tuple) != count) {
            PyErr_SetString(PyExc_ValueError, "ids changed length during the call");
            goto done;
        }
        PyObject *const *items = &PyTuple_GET_ITEM(id_tuple, 0);
        Py_ssize_t monitor_missing =
            find_rows(monitor.index, items, count, monitor.capacity, scratch);
        Py_ssize_t store_missing =
            monitor_missing ? monitor_missing
                            : find_rows(store.index, items, count, store.capacity,
                                        scratch + count);
        if (monitor_missing < 0 || store_missing < 0) {
            goto done;
        }
        if (monitor_missing || store_missing ||
            has_repeats(scratch, count, scratch + 2 * count)) {
            result = Py_NewRef(Py_None);
            goto done;
        }
        monitor_known = monitor_rows = scratch;
        store_known = store_rows = scratch + count;
    } else {
        PyObject *objects[4];
        if (!PyTuple_Check(given_object)) {
            PyErr_SetString(PyExc_TypeError, "given must be None or a tuple");
            goto done;
        }
        if (!PyArg_ParseTuple(given_object, "OOOO", &objects[0], &objects[1],
                              &objects[2], &objects[3]) ||
            take_given(objects[0], objects[1], &a[5], &a[6], count,
                       monitor.capacity) != 0) {
            goto done;
        }
        if (take_given(objects[2], objects[3], &a[7], &a[8], count,
                       store.capacity) != 0) {
            goto done;
        }
        monitor_known = (const int64_t *)a[5].view.buf;
        monitor_rows = (const int64_t *)a[6].view.buf;
        store_known = (const int64_t *)a[7].view.buf;
        store_rows = (const int64_t *)a[8].view.buf;
    }

    MonitorSums sums = observe_rows(p, monitor_known, monitor_rows, &monitor,
                                    monitor_stamp, teacher_round, entropy_scale,
                                    entropy);
    /* As DriftBoost.starts: a batch smaller than boost_min_rows needs drift
     * in every row. */
    long long needed_rows = boost_min_rows < count ? boost_min_rows : count;
    int spike = boost_updates > 0 && sums.drift_count > 0 &&
                sums.drift_count >= needed_rows &&
                sums.drift_sum / (double)sums.drift_count > threshold;
    if ((spike || boost_remaining > 0) && boost_lambda > lam) {
        lam = boost_lambda;
    }
    float *targets = (float *)soft->view.buf;
    smooth_rows(p, store_known, store_rows, &store, store_stamp, lam, targets);
    alpha_and_labels(entropy, targets, count, classes, coefficients,
                     hard->acquired ? (const int32_t *)hard->view.buf : NULL, argmax,
                     (float *)alpha->view.buf, (int32_t *)labels->view.buf);
    result = Py_BuildValue("(dddndO)", sums.entropy_sum, sums.confidence_sum,
                           sums.drift_sum, sums.drift_count, lam,
                           spike ? Py_True : Py_False);
done:
    Py_XDECREF(id_tuple);
    if (scratch != stack_scratch) {
        PyMem_Free(scratch);
        PyMem_Free(entropy);
    }
    release(a, 9);
    release_table(&monitor);
    release_table(&store);
    return result;
}

static PyMethodDef methods[] = {
    {"lookup", lookup, METH_VARARGS, lookup_doc},
    {"prepare", prepare, METH_VARARGS, prepare_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "_dynamic_kernel",
    "Compiled per-row loops of the dynamic part; see dslo_edge/dynamic_compiled.py.",
    -1,
    methods,
};

/* Raise it whenever the arguments of lookup or prepare change, with
   KERNEL_API_VERSION in dynamic_kernel.py. An editable install keeps a module
   built from the older source until it is rebuilt, and dynamic_kernel.py does
   not use such a module. */
#define API_VERSION 2

PyMODINIT_FUNC PyInit__dynamic_kernel(void) {
    PyObject *created = PyModule_Create(&module);
    if (created != NULL &&
        PyModule_AddIntConstant(created, "API_VERSION", API_VERSION) < 0) {
        Py_DECREF(created);
        return NULL;
    }
    return created;
}
