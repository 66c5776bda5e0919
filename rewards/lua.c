/* lua.c: reward scripts in a Lua 5.4 sandbox. The script defines reward(sample) (sample: prompt, completion,
 * tokens, truncated and every field of the dataset row) and returns a number, or nil and a reason (unscorable).
 *
 * The one idea: limits are breaches, and a breach is sticky. The allocator refuses memory past the cap, a count
 * hook stops the VM past the instruction budget or the deadline, and once either has fired every protected call
 * the script can reach (pcall, xpcall, coroutine.resume/wrap/close) re-raises, so a script cannot catch its way
 * past a limit. The breached state is then thrown away and rebuilt; the next sample runs in a clean one.
 * States are reused per worker (a state holds the loaded script and its sandbox), which is what makes a simple
 * script cost a few microseconds. The sandbox env has only the safe parts of the base library, string (no
 * dump), table, math, utf8 and coroutine; load is text-only and sees the sandbox, never _G. */
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/mem.h"
#include "rewards/reward.h"

#define HOOK_EVERY 1000 /* instructions between hook calls: the budget's and the clock's granularity */
#define ROW_DEPTH 32

typedef struct {
    char *path;   /* as given (relative to the recipe) */
    char *source; /* the script text */
    size_t len;
    int64_t instructions;
    size_t mem_cap;
    int64_t mem_mb;
} lua_impl;

enum { BREACH_NONE, BREACH_MEMORY, BREACH_INSTRUCTIONS, BREACH_TIME };

typedef struct {
    lua_State *L;
    const lua_impl *impl;
    size_t used, cap;
    int64_t steps, budget;
    double deadline, timeout_s;
    int breach;
    int reward_ref;
} sandbox;

/* ---- limits ------------------------------------------------------------------------------------------ */

static void *sb_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
    sandbox *sb = ud;
    if (!ptr) osize = 0; /* osize then encodes the object's type */
    if (nsize == 0) {
        free(ptr);
        sb->used -= osize;
        return NULL;
    }
    /* Refused, Lua collects garbage and tries once more; only a memory error that then propagates (see
     * note_mem_error) is a breach. */
    if (nsize > osize && sb->used - osize + nsize > sb->cap) return NULL;
    void *q = realloc(ptr, nsize);
    if (!q) return NULL;
    sb->used = sb->used - osize + nsize;
    return q;
}

static sandbox *sb_of(lua_State *L) {
    void *ud;
    lua_getallocf(L, &ud);
    return ud;
}

static const char *breach_text(const sandbox *sb, char *buf, size_t cap) {
    switch (sb->breach) {
    case BREACH_MEMORY: snprintf(buf, cap, "memory limit %lld MB", (long long)sb->impl->mem_mb); break;
    case BREACH_INSTRUCTIONS: snprintf(buf, cap, "instruction limit %lld", (long long)sb->budget); break;
    case BREACH_TIME: snprintf(buf, cap, "timeout %.1f s", sb->timeout_s); break;
    default: snprintf(buf, cap, "no limit breached"); break;
    }
    return buf;
}

static void sb_hook(lua_State *L, lua_Debug *ar) {
    (void)ar;
    sandbox *sb = sb_of(L);
    sb->steps += HOOK_EVERY;
    if (!sb->breach) {
        if (sb->steps > sb->budget) sb->breach = BREACH_INSTRUCTIONS;
        else if (reward_now() > sb->deadline) sb->breach = BREACH_TIME;
    }
    if (sb->breach) {
        char buf[96];
        luaL_error(L, "%s", breach_text(sb, buf, sizeof buf));
    }
}

/* A memory error (LUA_ERRMEM, or its message as coroutine.wrap relays it) marks the memory breach. */
static void note_mem_error(lua_State *L, int status, int idx) {
    sandbox *sb = sb_of(L);
    if (sb->breach) return;
    size_t n = 0;
    const char *m = lua_type(L, idx) == LUA_TSTRING ? lua_tolstring(L, idx, &n) : NULL;
    static const char memmsg[] = "not enough memory";
    if (status == LUA_ERRMEM || (m && n >= sizeof memmsg - 1 && !strcmp(m + n - (sizeof memmsg - 1), memmsg)))
        sb->breach = BREACH_MEMORY;
}

/* After a protected call inside the script: a breach goes on up (the error object is on the top). */
static void rethrow_breach(lua_State *L) {
    sandbox *sb = sb_of(L);
    if (sb->breach) {
        char buf[96];
        luaL_error(L, "%s", breach_text(sb, buf, sizeof buf));
    }
}

/* ---- the sandbox's protected calls ------------------------------------------------------------------- */

static int sb_pcall(lua_State *L) {
    luaL_checkany(L, 1);
    int st = lua_pcall(L, lua_gettop(L) - 1, LUA_MULTRET, 0);
    if (st != LUA_OK) note_mem_error(L, st, -1);
    rethrow_breach(L);
    lua_pushboolean(L, st == LUA_OK);
    lua_insert(L, 1);
    return lua_gettop(L);
}

static int sb_xpcall(lua_State *L) {
    int n = lua_gettop(L);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_pushvalue(L, 1);
    lua_copy(L, 2, 1);
    lua_replace(L, 2); /* 1: handler, 2: function, then the arguments */
    int st = lua_pcall(L, n - 2, LUA_MULTRET, 1);
    if (st != LUA_OK) note_mem_error(L, st, -1);
    rethrow_breach(L);
    lua_pushboolean(L, st == LUA_OK);
    lua_replace(L, 1);
    return lua_gettop(L);
}

/* coroutine.resume / wrap's function / close: the original as upvalue 1. */
static int sb_guarded(lua_State *L) {
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
    if (lua_gettop(L) >= 2 && lua_isboolean(L, 1) && !lua_toboolean(L, 1)) note_mem_error(L, LUA_ERRRUN, 2);
    rethrow_breach(L);
    return lua_gettop(L);
}

static int sb_wrap(lua_State *L) {
    /* coroutine.wrap(f): the real wrap's function, guarded */
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, 1);
    lua_pushcclosure(L, sb_guarded, 1);
    return 1;
}

/* load(chunk [, name [, mode [, env]]]): text only, and the sandbox env unless one is given. */
static int sb_load(lua_State *L) {
    int n = lua_gettop(L);
    lua_settop(L, 4);
    lua_pushvalue(L, lua_upvalueindex(1)); /* the real load */
    lua_pushvalue(L, 1);
    lua_pushvalue(L, 2);
    lua_pushliteral(L, "t");
    if (n >= 4) lua_pushvalue(L, 4);
    else lua_pushvalue(L, lua_upvalueindex(2));
    lua_call(L, 4, 2);
    return 2;
}

/* setmetatable without __gc: finalizers run with hooks off, outside every limit. */
static int sb_setmetatable(lua_State *L) {
    if (lua_istable(L, 2) && lua_getfield(L, 2, "__gc") != LUA_TNIL)
        return luaL_error(L, "__gc metamethods are not allowed in reward scripts");
    lua_settop(L, 2);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, 2, 1);
    return 1;
}

static int sb_collectgarbage(lua_State *L) {
    const char *opt = luaL_optstring(L, 1, "collect");
    if (strcmp(opt, "count") && strcmp(opt, "collect") && strcmp(opt, "step") && strcmp(opt, "isrunning"))
        return luaL_error(L, "collectgarbage('%s') is not allowed in reward scripts", opt);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
    return lua_gettop(L);
}

static int sb_print(lua_State *L) {
    (void)L; /* output is not captured: scores are the only channel */
    return 0;
}

/* env[name] = a copy of the library table `lib`, leaving out the names in skip. */
static void copy_lib(lua_State *L, int env, const char *lib, const char *const *skip) {
    lua_getglobal(L, lib);
    lua_newtable(L);
    lua_pushnil(L);
    while (lua_next(L, -3)) {
        int keep = lua_type(L, -2) == LUA_TSTRING;
        for (const char *const *s = skip; keep && s && *s; s++)
            if (!strcmp(lua_tostring(L, -2), *s)) keep = 0;
        if (keep) {
            lua_pushvalue(L, -2);
            lua_insert(L, -2);
            lua_settable(L, -4);
        } else {
            lua_pop(L, 1);
        }
    }
    lua_setfield(L, env, lib);
    lua_pop(L, 1);
}

/* Builds the sandbox env on the stack top. */
static void push_env(lua_State *L) {
    static const char *const base[] = {"assert", "error", "ipairs", "next", "pairs", "rawequal", "rawget", "rawlen",
                                       "rawset", "select", "getmetatable", "tonumber", "tostring", "type",
                                       "_VERSION", NULL};
    lua_newtable(L);
    int env = lua_gettop(L);
    for (const char *const *b = base; *b; b++) {
        lua_getglobal(L, *b);
        lua_setfield(L, env, *b);
    }
    lua_pushcfunction(L, sb_pcall);
    lua_setfield(L, env, "pcall");
    lua_pushcfunction(L, sb_xpcall);
    lua_setfield(L, env, "xpcall");
    lua_pushcfunction(L, sb_print);
    lua_setfield(L, env, "print");
    lua_getglobal(L, "setmetatable");
    lua_pushcclosure(L, sb_setmetatable, 1);
    lua_setfield(L, env, "setmetatable");
    lua_getglobal(L, "collectgarbage");
    lua_pushcclosure(L, sb_collectgarbage, 1);
    lua_setfield(L, env, "collectgarbage");
    lua_getglobal(L, "load");
    lua_pushvalue(L, env);
    lua_pushcclosure(L, sb_load, 2);
    lua_setfield(L, env, "load");
    static const char *const no_dump[] = {"dump", NULL};
    copy_lib(L, env, "string", no_dump);
    copy_lib(L, env, "table", NULL);
    copy_lib(L, env, "math", NULL);
    copy_lib(L, env, "utf8", NULL);
    copy_lib(L, env, "coroutine", NULL);
    lua_getfield(L, env, "coroutine");
    static const char *const guarded[] = {"resume", "close", NULL};
    for (const char *const *g = guarded; *g; g++) {
        lua_getfield(L, -1, *g);
        lua_pushcclosure(L, sb_guarded, 1);
        lua_setfield(L, -2, *g);
    }
    lua_getfield(L, -1, "wrap");
    lua_pushcclosure(L, sb_wrap, 1);
    lua_setfield(L, -2, "wrap");
    lua_pop(L, 1);
    lua_pushvalue(L, env);
    lua_setfield(L, env, "_G");
}

/* ---- states ------------------------------------------------------------------------------------------ */

static void sandbox_free(sandbox *sb) {
    if (!sb) return;
    if (sb->L) lua_close(sb->L);
    mem_free(sb);
}

/* Runs the function on the top with nargs arguments under the limits; returns the lua status. */
static int limited_call(sandbox *sb, int nargs, int nres, double timeout_s, double deadline) {
    sb->steps = 0;
    sb->breach = BREACH_NONE;
    sb->timeout_s = timeout_s;
    sb->deadline = deadline;
    return lua_pcall(sb->L, nargs, nres, 0);
}

static const char *error_text(lua_State *L, int idx) {
    const char *m = lua_tostring(L, idx);
    if (m) return m;
    return lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, idx));
}

static int sandbox_new(sandbox **out, const lua_impl *li, double timeout_s, mr_err *e) {
    *out = NULL;
    sandbox *sb = mem_calloc(1, sizeof *sb);
    if (!sb) return err_set(e, MR_ENOMEM, "out of memory");
    sb->impl = li;
    sb->cap = li->mem_cap;
    sb->budget = li->instructions;
    sb->reward_ref = LUA_NOREF;
    lua_State *L = lua_newstate(sb_alloc, sb);
    if (!L) {
        mem_free(sb);
        return err_set(e, MR_ENOMEM, "%s: could not create a Lua state", li->path);
    }
    sb->L = L;
    /* Only the libraries the sandbox copies from; io, os, package and debug are never opened. */
    static const luaL_Reg libs[] = {{LUA_GNAME, luaopen_base}, {LUA_STRLIBNAME, luaopen_string},
                                    {LUA_TABLIBNAME, luaopen_table}, {LUA_MATHLIBNAME, luaopen_math},
                                    {LUA_UTF8LIBNAME, luaopen_utf8}, {LUA_COLIBNAME, luaopen_coroutine}};
    for (size_t i = 0; i < sizeof libs / sizeof libs[0]; i++) {
        luaL_requiref(L, libs[i].name, libs[i].func, 1);
        lua_pop(L, 1);
    }
    /* The string metatable's __index is the real string table, reachable as ("").dump: drop dump there too,
     * and lock the metatable so a script cannot change string methods for the samples after it. */
    lua_getglobal(L, "string");
    lua_pushnil(L);
    lua_setfield(L, -2, "dump");
    lua_pop(L, 1);
    lua_pushliteral(L, "");
    lua_getmetatable(L, -1);
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "__metatable");
    lua_pop(L, 2);

    push_env(L);
    if (luaL_loadbufferx(L, li->source, li->len, lua_pushfstring(L, "@%s", li->path), "t") != LUA_OK) {
        err_set(e, MR_EINVAL, "%s", error_text(L, -1));
        goto fail;
    }
    lua_remove(L, -2); /* the chunk name */
    lua_pushvalue(L, -2);
    lua_setupvalue(L, -2, 1); /* _ENV = the sandbox */
    lua_sethook(L, sb_hook, LUA_MASKCOUNT, HOOK_EVERY);
    int st = limited_call(sb, 0, 0, timeout_s, reward_now() + timeout_s);
    if (st != LUA_OK) {
        char buf[96];
        note_mem_error(L, st, -1);
        err_set(e, MR_EINVAL, "%s: running the script: %s", li->path,
                sb->breach ? breach_text(sb, buf, sizeof buf) : error_text(L, -1));
        goto fail;
    }
    if (lua_getfield(L, -1, "reward") != LUA_TFUNCTION) {
        err_set(e, MR_EINVAL, "%s: the script must define a function reward(sample), found %s", li->path,
                luaL_typename(L, -1));
        goto fail;
    }
    sb->reward_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_settop(L, 0);
    *out = sb;
    return 0;
fail:
    sandbox_free(sb);
    return e ? e->code : MR_EINVAL;
}

/* ---- samples as tables ------------------------------------------------------------------------------- */

static void push_json(lua_State *L, const cJSON *v, int depth) {
    if (depth > ROW_DEPTH || !v || cJSON_IsNull(v)) {
        lua_pushnil(L);
    } else if (cJSON_IsString(v)) {
        lua_pushstring(L, v->valuestring);
    } else if (cJSON_IsNumber(v)) {
        double d = v->valuedouble;
        lua_Integer i = (lua_Integer)d;
        if ((double)i == d && d > -9.0e15 && d < 9.0e15) lua_pushinteger(L, i);
        else lua_pushnumber(L, d);
    } else if (cJSON_IsBool(v)) {
        lua_pushboolean(L, cJSON_IsTrue(v));
    } else if (cJSON_IsArray(v)) {
        lua_createtable(L, cJSON_GetArraySize(v), 0);
        lua_Integer k = 1;
        for (const cJSON *c = v->child; c; c = c->next, k++) {
            push_json(L, c, depth + 1);
            lua_rawseti(L, -2, k);
        }
    } else if (cJSON_IsObject(v)) {
        lua_createtable(L, 0, cJSON_GetArraySize(v));
        for (const cJSON *c = v->child; c; c = c->next) {
            if (!c->string) continue;
            push_json(L, c, depth + 1);
            lua_setfield(L, -2, c->string);
        }
    } else {
        lua_pushnil(L);
    }
}

static int push_sample(lua_State *L) {
    const reward_sample *s = lua_touserdata(L, 1);
    if (s->row && cJSON_IsObject(s->row)) push_json(L, s->row, 0);
    else lua_createtable(L, 0, 4);
    lua_pushstring(L, s->prompt ? s->prompt : "");
    lua_setfield(L, -2, "prompt");
    lua_pushstring(L, s->completion ? s->completion : "");
    lua_setfield(L, -2, "completion");
    lua_pushinteger(L, (lua_Integer)s->tokens);
    lua_setfield(L, -2, "tokens");
    lua_pushboolean(L, s->truncated);
    lua_setfield(L, -2, "truncated");
    return 1;
}

/* ---- the plugin -------------------------------------------------------------------------------------- */

static void lua_plugin_free(reward_plugin *p) {
    lua_impl *li = p->impl;
    if (!li) return;
    mem_free(li->path);
    mem_free(li->source);
    mem_free(li);
    p->impl = NULL;
}

static int read_script(lua_impl *li, const char *path, const char *dir, mr_err *e) {
    char full[2048];
    FILE *f = NULL;
    if (path[0] != '/') {
        snprintf(full, sizeof full, "%s/%s", dir, path);
        f = fopen(full, "rb");
    }
    if (!f) f = fopen(path, "rb");
    if (!f) return err_set(e, MR_EIO, "cannot open the Lua script %s (relative to %s or the working directory)", path, dir);
    size_t cap = 4096, n = 0;
    char *buf = mem_alloc(cap);
    while (buf) {
        n += fread(buf + n, 1, cap - n - 1, f);
        if (n < cap - 1) break;
        char *nb = cap < (64u << 20) ? mem_realloc(buf, cap * 2) : NULL;
        if (!nb) {
            mem_free(buf);
            buf = NULL;
            break;
        }
        buf = nb;
        cap *= 2;
    }
    int bad = ferror(f);
    fclose(f);
    if (!buf) return err_set(e, MR_ENOMEM, "%s: script too large or out of memory", path);
    if (bad) {
        mem_free(buf);
        return err_set(e, MR_EIO, "%s: read error", path);
    }
    buf[n] = '\0';
    li->source = buf;
    li->len = n;
    return 0;
}

static int lua_plugin_init(reward_plugin *p, const recipe *r, const char *item, const char *dir, mr_err *e) {
    lua_impl *li = mem_calloc(1, sizeof *li);
    if (!li) return err_set(e, MR_ENOMEM, "out of memory");
    p->impl = li;
    char path[128];
    snprintf(path, sizeof path, "%s.lua.script", item);
    const char *script = recipe_str(r, path);
    li->path = mem_strdup(script ? script : "");
    if (!li->path) return err_set(e, MR_ENOMEM, "out of memory");
    snprintf(path, sizeof path, "%s.lua.instructions", item);
    li->instructions = recipe_int(r, path);
    snprintf(path, sizeof path, "%s.lua.memory_mb", item);
    li->mem_mb = recipe_int(r, path);
    li->mem_cap = (size_t)li->mem_mb << 20;
    int rc = read_script(li, li->path, dir, e);
    if (rc != 0) return rc;
    /* Load and run it once now, so a syntax error or a missing reward() stops the run before any work. */
    sandbox *sb = NULL;
    double t = p->timeout_s > 0 ? p->timeout_s : 10.0;
    if ((rc = sandbox_new(&sb, li, t, e)) != 0) return rc;
    sandbox_free(sb);
    return 0;
}

static int lua_worker_init(const reward_plugin *p, void **ws, mr_err *e) {
    return sandbox_new((sandbox **)ws, p->impl, p->timeout_s > 0 ? p->timeout_s : 10.0, e);
}

static void lua_worker_free(const reward_plugin *p, void *ws) {
    (void)p;
    sandbox_free(ws);
}

static void lua_score(const reward_plugin *p, void *ws, const reward_sample *s, double deadline, reward_result *out,
                      int *discard) {
    sandbox *sb = ws;
    lua_State *L = sb->L;
    lua_settop(L, 0);
    lua_rawgeti(L, LUA_REGISTRYINDEX, sb->reward_ref);
    /* The sample table is built inside the protected call: a row too big for the cap is a breach, not a panic. */
    lua_pushcfunction(L, push_sample);
    lua_pushlightuserdata(L, (void *)s);
    sb->breach = BREACH_NONE;
    int pst = lua_pcall(L, 1, 1, 0);
    if (pst != LUA_OK) {
        char buf[96];
        note_mem_error(L, pst, -1);
        reward_result_set(out, REWARD_ERROR, 0, "%s", sb->breach ? breach_text(sb, buf, sizeof buf) : error_text(L, -1));
        *discard = sb->breach != BREACH_NONE;
        lua_settop(L, 0);
        return;
    }
    int st = limited_call(sb, 1, 2, p->timeout_s, deadline);
    if (st != LUA_OK || sb->breach) {
        char buf[96];
        if (st != LUA_OK) note_mem_error(L, st, -1);
        if (sb->breach == BREACH_TIME) reward_result_set(out, REWARD_TIMEOUT, 0, "%s", breach_text(sb, buf, sizeof buf));
        else if (sb->breach) reward_result_set(out, REWARD_ERROR, 0, "%s", breach_text(sb, buf, sizeof buf));
        else reward_result_set(out, REWARD_ERROR, 0, "%s", error_text(L, -1));
        *discard = sb->breach != BREACH_NONE;
        lua_settop(L, 0);
        return;
    }
    int isnum = 0;
    lua_Number v = lua_tonumberx(L, 1, &isnum);
    if (isnum && lua_type(L, 1) == LUA_TNUMBER) {
        reward_result_set(out, REWARD_SCORE, (double)v, NULL);
    } else if (lua_isnil(L, 1)) {
        const char *why = lua_tostring(L, 2);
        reward_result_set(out, REWARD_UNSCORABLE, 0, "%s", why ? why : "reward() returned nil");
    } else {
        reward_result_set(out, REWARD_ERROR, 0, "reward() returned a %s, expected a number (or nil and a reason)",
                          luaL_typename(L, 1));
    }
    lua_settop(L, 0);
}

const reward_plugin_ops reward_lua_ops = {.kind = "lua",
                                          .init = lua_plugin_init,
                                          .worker_init = lua_worker_init,
                                          .worker_free = lua_worker_free,
                                          .score = lua_score,
                                          .free = lua_plugin_free};
