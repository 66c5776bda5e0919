/* test_reward_lua.c: Lua reward scripts. Ordinary scripts (numbers, nil and a reason, every row field), load
 * errors named at init, and the adversarial table: infinite loops, string.rep and table memory bombs, io/os
 * access, binary chunks, coroutine abuse, non-string error objects, deep recursion, pcall that tries to swallow
 * a limit. Each is contained within its limit (+10%), scored with the right status and reason, and the sample
 * after it is scored normally by the same worker. */
#include <criterion/criterion.h>
#include <lauxlib.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/mem.h"
#include "core/recipe.h"
#include "rewards/reward.h"
#include "tests/testutil.h"

#define BASE "run:\n  name: t\nmodel:\n  preset: tiny\ntokenizer:\n  train:\ndata:\n  generator:\n    task: arithmetic\n"

/* A set with one Lua plugin running `script`; one worker so the state reuse is observable. */
static reward_set *lua_set(const char *script, const char *opts, mr_err *e, int *rc) {
    char *dir = tu_tmpdir();
    char *sp = tu_path(dir, "s.lua");
    cr_assert_eq(tu_write(sp, script, (size_t)-1), 0);
    char text[2048], src[1024];
    snprintf(text, sizeof text, "%srewards:\n  - lua:\n      script: s.lua\n%s", BASE, opts ? opts : "");
    snprintf(src, sizeof src, "%s/t.yaml", dir);
    recipe *r = NULL;
    cr_assert_eq(recipe_load_string(&r, text, src, e), 0, "%s", e->msg);
    cr_assert_eq(recipe_resolve(r, e), 0, "%s", e->msg);
    reward_set *s = NULL;
    reward_set_opts o = {.workers = 1};
    *rc = reward_set_init(&s, r, &o, e);
    recipe_free(r);
    free(sp);
    tu_rmtree(dir); /* the script was read at init */
    free(dir);
    return s;
}

static reward_set *lua_ok(const char *script, const char *opts) {
    mr_err e = {0};
    int rc;
    reward_set *s = lua_set(script, opts, &e, &rc);
    cr_assert_eq(rc, 0, "init: %s", e.msg);
    return s;
}

static reward_result run1(reward_set *s, const char *completion, const char *row_json, double *secs) {
    cJSON *row = row_json ? cJSON_Parse(row_json) : NULL;
    reward_sample smp = {.prompt = "P", .completion = completion, .row = row, .tokens = 7, .truncated = 1};
    reward_result res;
    reward_outcome o;
    mr_err e = {0};
    double t0 = reward_now();
    cr_assert_eq(reward_set_score(s, &smp, 1, &res, &o, &e), 0, "%s", e.msg);
    if (secs) *secs = reward_now() - t0;
    cJSON_Delete(row);
    return res;
}

Test(lua, ordinary_script) {
    reward_set *s = lua_ok("function reward(s)\n"
                           "  if s.completion == 'skip' then return nil, 'no answer here' end\n"
                           "  return #s.completion + s.n + s.list[2] + (s.nested.k == 'v' and 100 or 0)\n"
                           "         + (s.truncated and 1000 or 0) + s.tokens * 10000 + (s.prompt == 'P' and 1e6 or 0)\n"
                           "end\n",
                           NULL);
    const char *row = "{\"n\": 5, \"list\": [10, 20], \"nested\": {\"k\": \"v\"}, \"completion\": \"ignored\"}";
    reward_result r = run1(s, "abc", row, NULL);
    cr_assert_eq(r.status, REWARD_SCORE, "%s", r.reason);
    cr_assert_float_eq(r.score, 3 + 5 + 20 + 100 + 1000 + 70000 + 1e6, 1e-9);
    r = run1(s, "skip", row, NULL);
    cr_assert_eq(r.status, REWARD_UNSCORABLE);
    cr_assert_str_eq(r.reason, "no answer here");
    reward_set_free(s);
}

Test(lua, bad_returns_and_errors) {
    reward_set *s = lua_ok("function reward(s)\n"
                           "  if s.completion == 'str' then return 'high' end\n"
                           "  if s.completion == 'tbl' then error({code = 1}) end\n"
                           "  if s.completion == 'nilerr' then error() end\n"
                           "  if s.completion == 'msg' then error('bad row') end\n"
                           "  if s.completion == 'nan' then return 0/0 end\n"
                           "  return 1\n"
                           "end\n",
                           NULL);
    reward_result r = run1(s, "str", NULL, NULL);
    cr_assert_eq(r.status, REWARD_ERROR);
    cr_assert_str_eq(r.reason, "reward() returned a string, expected a number (or nil and a reason)");
    r = run1(s, "tbl", NULL, NULL);
    cr_assert_eq(r.status, REWARD_ERROR);
    cr_assert_str_eq(r.reason, "(error object is a table value)");
    r = run1(s, "nilerr", NULL, NULL);
    cr_assert_str_eq(r.reason, "(error object is a nil value)");
    r = run1(s, "msg", NULL, NULL);
    cr_assert(strstr(r.reason, "s.lua:5: bad row"), "%s", r.reason);
    r = run1(s, "nan", NULL, NULL);
    cr_assert_eq(r.status, REWARD_ERROR);
    cr_assert(strstr(r.reason, "non-finite score"), "%s", r.reason);
    cr_assert_float_eq(run1(s, "ok", NULL, NULL).score, 1.0, 0);
    reward_set_free(s);
}

Test(lua, load_errors_named_at_init) {
    mr_err e = {0};
    int rc;
    reward_set *s = lua_set("function reward(s) return 1 en", NULL, &e, &rc);
    cr_assert_neq(rc, 0);
    cr_assert_null(s);
    cr_assert(strstr(e.msg, "rewards[0] (lua)") && strstr(e.msg, "s.lua:1:"), "%s", e.msg);
    s = lua_set("x = 1", NULL, &e, &rc);
    cr_assert_neq(rc, 0);
    cr_assert(strstr(e.msg, "must define a function reward(sample), found nil"), "%s", e.msg);
    s = lua_set("while true do end", "      instructions: 100000\n", &e, &rc);
    cr_assert_neq(rc, 0);
    cr_assert(strstr(e.msg, "running the script: instruction limit 100000"), "%s", e.msg);
    s = lua_set("local f = io.open('/etc/passwd')", NULL, &e, &rc);
    cr_assert_neq(rc, 0);
    cr_assert(strstr(e.msg, "global 'io'"), "%s", e.msg);
}

/* The adversaries: `which` selects the attack, anything else scores 1. */
static const char adversary[] =
    "local function attack(w, s)\n"
    "  if w == 'loop' then while true do end end\n"
    "  if w == 'rep' then return #string.rep('x', 1 << 30) end\n"
    "  if w == 'rep_method' then local x = ('x'):rep(1 << 20); return #x:rep(1 << 10) end\n"
    "  if w == 'table' then local t = {} for i = 1, 1e9 do t[i] = {i} end end\n"
    "  if w == 'concat' then local t = {} for i = 1, 1e9 do t[#t+1] = tostring(i) .. 'abcdefgh' end\n"
    "    return #table.concat(t) end\n"
    "  if w == 'io' then return io.open('/etc/passwd'):read('a') end\n"
    "  if w == 'os' then os.execute('touch /tmp/moerl_pwned') end\n"
    "  if w == 'require' then require('os') end\n"
    "  if w == 'dofile' then dofile('/etc/passwd') end\n"
    "  if w == 'debug' then debug.sethook() end\n"
    "  if w == 'dump' then return string.dump(reward) end\n"
    "  if w == 'dump_method' then return (''):dump() end\n"
    "  if w == 'binary' then local f, err = load(s.chunk, 'c', 'b'); if not f then error(err) end; return f() end\n"
    "  if w == 'load_env' then return load('return io')() == nil and 5 or 0 end\n"
    "  if w == 'metatable' then getmetatable('').__index = {} end\n"
    "  if w == 'gc' then setmetatable({}, {__gc = function() while true do end end}) end\n"
    "  if w == 'collect' then collectgarbage('stop') end\n"
    "  if w == 'co_loop' then local co = coroutine.wrap(function() while true do end end); co() end\n"
    "  if w == 'co_swallow' then\n"
    "    while true do coroutine.resume(coroutine.create(function() while true do end end)) end end\n"
    "  if w == 'co_many' then local t = {} for i = 1, 1e9 do t[i] = coroutine.create(print) end end\n"
    "  if w == 'pcall_swallow' then while true do pcall(function() while true do end end) end end\n"
    "  if w == 'pcall_mem' then\n"
    "    while true do pcall(string.rep, 'x', 1 << 30) end end\n"
    "  if w == 'xpcall_swallow' then\n"
    "    while true do xpcall(function() while true do end end, function(m) return m end) end end\n"
    "  if w == 'recursion' then local function f(n) return 1 + f(n + 1) end return f(1) end\n"
    "  if w == 'deep_c' then local function f() pcall(f) return 1 end return f() end\n"
    "  if w == 'sort' then local t = {} for i = 1, 1000 do t[i] = i end\n"
    "    table.sort(t, function(a, b) while true do end end) end\n"
    "  if w == 'gsub' then return (string.gsub(string.rep('a', 100), 'a', function() while true do end end)) end\n"
    "  return 1\n"
    "end\n"
    "function reward(s) return attack(s.which, s) end\n";

typedef struct {
    const char *which;
    reward_status status;
    const char *reason; /* substring */
} attack_case;

static void run_attacks(const attack_case *cases, size_t n, const char *extra_row) {
    /* The clock is not the limit under test here (the 2M-instruction budget and the 16 MB cap are; they stop
     * every attack in ~0.1 s, a few times that under ASan): 1 s keeps a slow build from racing them. */
    reward_set *s = lua_ok(adversary, "      instructions: 2000000\n      memory_mb: 16\n    timeout_s: 1.0\n");
    for (size_t i = 0; i < n; i++) {
        char row[8192];
        snprintf(row, sizeof row, "{\"which\": \"%s\"%s}", cases[i].which, extra_row ? extra_row : "");
        double secs;
        reward_result r = run1(s, "c", row, &secs);
        /* reason "limit": whichever limit comes first, the clock included (a race between them on a slow build) */
        int any_limit = !strcmp(cases[i].reason, "limit") && r.status == REWARD_TIMEOUT;
        cr_expect(r.status == cases[i].status || any_limit, "%s: status %s (%s)", cases[i].which,
                  reward_status_name(r.status), r.reason);
        cr_expect(strstr(r.reason, cases[i].reason) != NULL || (any_limit && strstr(r.reason, "timeout")),
                  "%s: reason '%s', expected '%s'", cases[i].which, r.reason, cases[i].reason);
        cr_expect_lt(secs, 1.1, "%s: took %.3f s, the limit is 1 s", cases[i].which, secs);
        /* the next sample, same worker: scored normally */
        r = run1(s, "c", "{\"which\": \"none\"}", NULL);
        cr_expect_eq(r.status, REWARD_SCORE, "after %s: %s", cases[i].which, r.reason);
        cr_expect_float_eq(r.score, 1.0, 0, "after %s", cases[i].which);
    }
    reward_set_free(s);
}

Test(lua, adversarial_limits) {
    static const attack_case cases[] = {
        {"loop", REWARD_ERROR, "instruction limit 2000000"},
        {"rep", REWARD_ERROR, "memory limit 16 MB"},
        {"rep_method", REWARD_ERROR, "memory limit 16 MB"},
        {"table", REWARD_ERROR, "memory limit 16 MB"},
        {"concat", REWARD_ERROR, "limit"},
        {"co_loop", REWARD_ERROR, "instruction limit 2000000"},
        {"co_swallow", REWARD_ERROR, "instruction limit 2000000"},
        {"co_many", REWARD_ERROR, "memory limit 16 MB"},
        {"pcall_swallow", REWARD_ERROR, "instruction limit 2000000"},
        {"pcall_mem", REWARD_ERROR, "memory limit 16 MB"},
        {"xpcall_swallow", REWARD_ERROR, "instruction limit 2000000"},
        {"recursion", REWARD_ERROR, "memory limit 16 MB"}, /* the Lua stack is memory: the cap comes first */
        {"deep_c", REWARD_SCORE, ""}, /* pcall nesting hits the C-stack limit, caught: the script goes on */
        {"sort", REWARD_ERROR, "instruction limit 2000000"},
        {"gsub", REWARD_ERROR, "instruction limit 2000000"},
    };
    run_attacks(cases, sizeof cases / sizeof cases[0], NULL);
}

Test(lua, adversarial_escapes) {
    static const attack_case cases[] = {
        {"io", REWARD_ERROR, "global 'io'"},
        {"os", REWARD_ERROR, "global 'os'"},
        {"require", REWARD_ERROR, "global 'require'"},
        {"dofile", REWARD_ERROR, "global 'dofile'"},
        {"debug", REWARD_ERROR, "global 'debug'"},
        {"dump", REWARD_ERROR, "field 'dump'"},
        {"dump_method", REWARD_ERROR, "method 'dump'"},
        {"load_env", REWARD_SCORE, ""},
        {"metatable", REWARD_ERROR, "attempt to index a boolean value"},
        {"gc", REWARD_ERROR, "__gc metamethods are not allowed"},
        {"collect", REWARD_ERROR, "collectgarbage('stop') is not allowed"},
    };
    run_attacks(cases, sizeof cases / sizeof cases[0], NULL);
}

/* A binary chunk made outside the sandbox (string.dump in a full state) and handed in through the row. */
Test(lua, deep_recursion_stack_overflow) {
    /* with room in memory, the VM's own stack limit (LUAI_MAXSTACK) stops the recursion */
    reward_set *s = lua_ok("local function f(n) return 1 + f(n + 1) end\nfunction reward(s) return f(1) end\n",
                           "      memory_mb: 256\n");
    reward_result r = run1(s, "c", NULL, NULL);
    cr_assert_eq(r.status, REWARD_ERROR);
    cr_assert(strstr(r.reason, "stack overflow"), "%s", r.reason);
    reward_set_free(s);
}

Test(lua, binary_chunk_refused) {
    lua_State *L = luaL_newstate();
    luaL_openlibs(L);
    cr_assert_eq(luaL_dostring(L, "return string.dump(function() return 99 end)"), 0);
    size_t n;
    const char *bin = lua_tolstring(L, -1, &n);
    cJSON *row = cJSON_CreateObject();
    cJSON_AddStringToObject(row, "which", "binary");
    /* cJSON strings stop at NUL; Lua bytecode has NULs after the header, but the signature is what load checks */
    char *esc = mem_alloc(n + 1);
    memcpy(esc, bin, n);
    esc[n] = '\0';
    cJSON_AddStringToObject(row, "chunk", esc);
    mem_free(esc);
    lua_close(L);
    reward_set *s = lua_ok(adversary, NULL);
    reward_sample smp = {.prompt = "", .completion = "c", .row = row};
    reward_result r;
    reward_outcome o;
    mr_err e = {0};
    cr_assert_eq(reward_set_score(s, &smp, 1, &r, &o, &e), 0);
    cr_assert_eq(r.status, REWARD_ERROR);
    cr_assert(strstr(r.reason, "attempt to load a binary chunk (mode is 't')"), "%s", r.reason);
    cJSON_Delete(row);
    reward_set_free(s);
}

Test(lua, timeout_within_ten_percent) {
    /* a generous instruction budget: the clock is what stops it */
    reward_set *s = lua_ok("function reward(s) if s.which == 'spin' then while true do end end return 2 end\n",
                           "      instructions: 1000000000000\n    timeout_s: 0.3\n");
    double secs;
    reward_result r = run1(s, "c", "{\"which\": \"spin\"}", &secs);
    cr_assert_eq(r.status, REWARD_TIMEOUT, "%s", r.reason);
    cr_assert_str_eq(r.reason, "timeout 0.3 s");
    cr_assert_geq(secs, 0.29);
    cr_assert_lt(secs, 0.33, "took %.3f s", secs);
    r = run1(s, "c", "{\"which\": \"none\"}", NULL);
    cr_assert_float_eq(r.score, 2.0, 0);
    reward_stats st;
    reward_set_stats(s, 0, &st);
    cr_assert_eq(st.n, 2);
    cr_assert_float_eq(st.timeout_rate, 0.5, 1e-12);
    reward_set_free(s);
}

Test(lua, instruction_budget_within_ten_percent) {
    /* the loop counts its own iterations; the budget stops it within +10% of the limit */
    reward_set *s = lua_ok("n = 0\nfunction reward(s)\n"
                           "  if s.which == 'count' then n = 0 while true do n = n + 1 end end\n"
                           "  return n\nend\n",
                           "      instructions: 1000000\n");
    reward_result r = run1(s, "c", "{\"which\": \"count\"}", NULL);
    cr_assert_eq(r.status, REWARD_ERROR);
    reward_set_free(s);
    /* a state that was not discarded keeps n: measure with pcall-free counting in a second script */
    s = lua_ok("function reward(s)\n  local n = 0\n  for i = 1, s.iters do n = n + 1 end\n  return n\nend\n",
               "      instructions: 1000000\n");
    /* a numeric for loop is ~2 instructions per iteration: 400k iterations pass, 600k do not */
    cr_assert_eq(run1(s, "c", "{\"iters\": 400000}", NULL).status, REWARD_SCORE);
    cr_assert_eq(run1(s, "c", "{\"iters\": 600000}", NULL).status, REWARD_ERROR);
    reward_set_free(s);
}

Test(lua, states_reused_and_recreated) {
    /* globals persist in a worker's state between samples; a breach throws the state away */
    reward_set *s = lua_ok("calls = 0\nfunction reward(s)\n  calls = calls + 1\n"
                           "  if s.which == 'bomb' then return #string.rep('x', 1 << 30) end\n"
                           "  return calls\nend\n",
                           "      memory_mb: 8\n");
    double a = run1(s, "c", "{}", NULL).score, b = run1(s, "c", "{}", NULL).score;
    cr_assert_float_eq(a, 1.0, 0);
    cr_assert_float_eq(b, 2.0, 0);
    reward_result r = run1(s, "c", "{\"which\": \"bomb\"}", NULL);
    cr_assert_str_eq(r.reason, "memory limit 8 MB");
    double c = run1(s, "c", "{}", NULL).score;
    cr_assert_float_eq(c, 1.0, 0); /* a fresh state */
    reward_set_free(s);
}

Test(lua, example_recipe_script) {
    /* recipes/rewards-lua.yaml with its script, as a user would run it */
    char path[1024];
    snprintf(path, sizeof path, "%s/recipes/rewards-lua.yaml", tu_src());
    recipe *r = NULL;
    mr_err e = {0};
    cr_assert_eq(recipe_load(&r, path, &e), 0, "%s", e.msg);
    cr_assert_eq(recipe_resolve(r, &e), 0, "%s", e.msg);
    reward_set *s = NULL;
    cr_assert_eq(reward_set_init(&s, r, NULL, &e), 0, "%s", e.msg);
    recipe_free(r);
    cJSON *row = cJSON_Parse("{\"answer\": \"1234\"}");
    reward_sample smp[3] = {
        {.prompt = "", .completion = "<think>ok</think><answer>1,234</answer>", .row = row},
        {.prompt = "", .completion = "<think>ok</think><answer>1235</answer>", .row = row},
        {.prompt = "", .completion = "no tags", .row = row},
    };
    reward_outcome o[3];
    reward_result res[6];
    cr_assert_eq(reward_set_score(s, smp, 3, res, o, &e), 0, "%s", e.msg);
    double len = (double)strlen(smp[0].completion);
    cr_assert_float_eq(o[0].total, 1.0 - 0.1 * len / 200 + 0.2, 1e-12, "%s", o[0].reason);
    cr_assert_float_eq(o[1].total, 0.2, 1e-12);
    cr_assert_eq(o[2].status, REWARD_UNSCORABLE);
    cr_assert_str_eq(o[2].reason, "lua: no <answer> tag");
    cJSON_Delete(row);
    reward_set_free(s);
}
