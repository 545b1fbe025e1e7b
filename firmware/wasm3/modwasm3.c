/* dpwasm3: the MicroPython binding of the firmware's wasm job engine (dp_engine.c).
 *
 *   dpwasm3.run(module, entry, args, env, stdin, job_id,
 *               timeout_ms, memory_mb, stdout_cap, stderr_cap, gas)
 *       -> (status, exit_code, returns_json, error, stdout, stderr, wall_ms)
 *   dpwasm3.cancel()    ask the running job to stop ("cancelled")
 *   dpwasm3.version()
 *
 * module and stdin are bytes, entry and job_id str, args a list of str, env a list of
 * "KEY=VALUE" str; status is "completed" or "failed", exit_code an int or None, returns_json
 * a JSON array (str) or None. run() lets other threads run while the job does (the GIL is
 * released): firmware/wasm3_exec.py calls it from a thread of its own. */

#include "py/runtime.h"
#include "py/objstr.h"

#include "dp_engine.h"

static DpStr str_of(mp_obj_t o) {
    size_t n;
    const char *p = mp_obj_str_get_data(o, &n);
    DpStr s = {(const uint8_t *)p, (uint32_t)n};
    return s;
}

static DpStr *strs_of(mp_obj_t list, uint32_t *count) {
    size_t n;
    mp_obj_t *items;
    mp_obj_get_array(list, &n, &items);
    DpStr *out = m_new(DpStr, n ? n : 1);
    for (size_t i = 0; i < n; i++) out[i] = str_of(items[i]);
    *count = (uint32_t)n;
    return out;
}

static uint64_t count_of(mp_obj_t o, const char *what) {
    mp_int_t v = mp_obj_get_int(o);
    if (v < 0) mp_raise_msg_varg(&mp_type_ValueError, MP_ERROR_TEXT("%s must not be negative"), what);
    return (uint64_t)v;
}

static mp_obj_t dpwasm3_run(size_t n_args, const mp_obj_t *args) {
    (void)n_args;
    mp_buffer_info_t module, in;
    mp_get_buffer_raise(args[0], &module, MP_BUFFER_READ);
    mp_get_buffer_raise(args[4], &in, MP_BUFFER_READ);
    DpJob job;
    memset(&job, 0, sizeof job);
    job.module = module.buf;
    job.module_len = module.len;
    job.entry = str_of(args[1]);
    job.args = strs_of(args[2], &job.nargs);
    job.env = strs_of(args[3], &job.nenv);
    job.stdin_bytes = in.buf;
    job.stdin_len = in.len;
    job.job_id = str_of(args[5]);
    job.timeout_ms = count_of(args[6], "timeout_ms");
    job.memory_mb = count_of(args[7], "memory_mb");
    job.stdout_cap = count_of(args[8], "stdout_cap");
    job.stderr_cap = count_of(args[9], "stderr_cap");
    job.gas = count_of(args[10], "gas");

    DpResult res;
    /* The inputs stay referenced from this stack (the GC scans it) while the job runs. */
    MP_THREAD_GIL_EXIT();
    dp_run(&job, &res);
    MP_THREAD_GIL_ENTER();

    mp_obj_t out[7] = {
        MP_OBJ_NEW_QSTR(res.completed ? MP_QSTR_completed : MP_QSTR_failed),
        res.exit_code < 0 ? mp_const_none : mp_obj_new_int_from_ll(res.exit_code),
        res.returns ? mp_obj_new_str(res.returns, strlen(res.returns)) : mp_const_none,
        res.error ? mp_obj_new_str(res.error, strlen(res.error)) : mp_const_none,
        mp_obj_new_bytes(res.out ? res.out : (const uint8_t *)"", res.out_len),
        mp_obj_new_bytes(res.err ? res.err : (const uint8_t *)"", res.err_len),
        mp_obj_new_int_from_ull(res.wall_ms),
    };
    dp_release();
    return mp_obj_new_tuple(7, out);
}
static MP_DEFINE_CONST_FUN_OBJ_VAR_BETWEEN(dpwasm3_run_obj, 11, 11, dpwasm3_run);

static mp_obj_t dpwasm3_cancel(void) {
    dp_cancel();
    return mp_const_none;
}
static MP_DEFINE_CONST_FUN_OBJ_0(dpwasm3_cancel_obj, dpwasm3_cancel);

static mp_obj_t dpwasm3_version(void) {
    const char *v = dp_version();
    return mp_obj_new_str(v, strlen(v));
}
static MP_DEFINE_CONST_FUN_OBJ_0(dpwasm3_version_obj, dpwasm3_version);

static const mp_rom_map_elem_t dpwasm3_globals_table[] = {
    {MP_ROM_QSTR(MP_QSTR___name__), MP_ROM_QSTR(MP_QSTR_dpwasm3)},
    {MP_ROM_QSTR(MP_QSTR_run), MP_ROM_PTR(&dpwasm3_run_obj)},
    {MP_ROM_QSTR(MP_QSTR_cancel), MP_ROM_PTR(&dpwasm3_cancel_obj)},
    {MP_ROM_QSTR(MP_QSTR_version), MP_ROM_PTR(&dpwasm3_version_obj)},
};
static MP_DEFINE_CONST_DICT(dpwasm3_globals, dpwasm3_globals_table);

const mp_obj_module_t dpwasm3_user_cmodule = {
    .base = {&mp_type_module},
    .globals = (mp_obj_dict_t *)&dpwasm3_globals,
};

MP_REGISTER_MODULE(MP_QSTR_dpwasm3, dpwasm3_user_cmodule);
