/* test_reward_rules.c: the rule plugins. math: answer extraction and comparison, table-driven from real answer
 * formats (GSM8K "#### x", MATH \boxed{}, R1 <answer>); format: R1 structure strict/lenient, answer tags, PCRE2
 * regex, DAPO's overlong penalty; toolcall: JSON / XML / YAML calls on the 1.0 / 0.8 / 0.3 / 0 scale and the
 * JSON Schema subset. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/mem.h"
#include "core/recipe.h"
#include "rewards/reward.h"

#define BASE "run:\n  name: t\nmodel:\n  preset: tiny\ntokenizer:\n  train:\ndata:\n  generator:\n    task: arithmetic\n"

static reward_set *set_from(const char *rewards_yaml) {
    char text[4096];
    snprintf(text, sizeof text, "%srewards:\n%s", BASE, rewards_yaml);
    recipe *r = NULL;
    mr_err e = {0};
    cr_assert_eq(recipe_load_string(&r, text, "t.yaml", &e), 0, "%s", e.msg);
    cr_assert_eq(recipe_resolve(r, &e), 0, "%s", e.msg);
    reward_set *s = NULL;
    reward_set_opts o = {.workers = 2};
    cr_assert_eq(reward_set_init(&s, r, &o, &e), 0, "%s", e.msg);
    recipe_free(r);
    return s;
}

/* Scores one completion against a row given as JSON text; returns plugin 0's result. */
static reward_result score1(reward_set *s, const char *prompt, const char *completion, const char *row_json) {
    cJSON *row = row_json ? cJSON_Parse(row_json) : NULL;
    if (row_json) cr_assert_not_null(row, "bad row %s", row_json);
    reward_sample smp = {.prompt = prompt, .completion = completion, .row = row};
    reward_result res[8];
    reward_outcome o;
    mr_err e = {0};
    cr_assert_eq(reward_set_score(s, &smp, 1, res, &o, &e), 0, "%s", e.msg);
    cJSON_Delete(row);
    return res[0];
}

/* ---- math -------------------------------------------------------------------------------------------- */

Test(math, extraction_table) {
    static const struct {
        const char *text;
        math_extract mode;
        int found;
        const char *want;
    } cases[] = {
        {"Natalia sold 48/2 = 24 clips in May.\n48+24 = 72\n#### 72", MATH_AUTO, 1, "72"},
        {"so the total is $1,234.\n#### 1,234", MATH_HASH, 1, "1,234"},
        {"Thus the answer is $\\boxed{\\frac{1}{2}}$.", MATH_AUTO, 1, "\\frac{1}{2}"},
        {"\\boxed{\\dfrac{\\sqrt{3}}{2}} and more text", MATH_BOXED, 1, "\\dfrac{\\sqrt{3}}{2}"},
        {"first \\boxed{1} then \\boxed{ {2}+{3} }", MATH_BOXED, 1, " {2}+{3} "},
        {"The answer is \\boxed 7.", MATH_BOXED, 1, "7."},
        {"<think>2+2 is 4</think><answer>4</answer>", MATH_AUTO, 1, "4"},
        {"<think>..</think><answer>The result is \\boxed{12}</answer>", MATH_ANSWER_TAG, 1, "12"},
        {"<answer>3</answer> wait <answer>5</answer>", MATH_ANSWER_TAG, 1, "5"},
        {"I think it's 12 or maybe -3.5 apples", MATH_LAST_NUMBER, 1, "-3.5"},
        {"ratio 3/4 of them", MATH_LAST_NUMBER, 1, "3/4"},
        {"costs 1,250,000 dollars", MATH_LAST_NUMBER, 1, "1,250,000"},
        {"no digits at all", MATH_AUTO, 0, ""},
        {"\\boxed{unclosed", MATH_BOXED, 0, ""},
        {"<answer>no close", MATH_ANSWER_TAG, 0, ""},
        {"#### \n", MATH_HASH, 0, ""},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char out[256];
        int f = math_extract_answer(cases[i].text, cases[i].mode, out, sizeof out);
        cr_expect_eq(f, cases[i].found, "case %zu: found %d", i, f);
        if (f) cr_expect_str_eq(out, cases[i].want, "case %zu", i);
    }
}

Test(math, equality_table) {
    static const struct {
        const char *got, *want;
        double tol;
        int eq;
    } cases[] = {
        {"72", "72", 0, 1},
        {"72.0", "72", 0, 1},
        {"+72", "72", 0, 1},
        {"1,234", "1234", 0, 1},
        {"$1,234.50$", "1234.5", 0, 1},
        {"\\frac{1}{2}", "0.5", 0, 1},
        {"\\dfrac{3}{4}", "3/4", 0, 1},
        {"-\\frac{1}{3}", "-1/3", 0, 1},
        {"\\frac12", "1/2", 0, 1},
        {"50\\%", "50", 0, 1},
        {"50%", "0.5", 0, 1},
        {"12 cm", "12", 0, 1},
        {"\\text{12 apples}", "12", 0, 1},
        {"x = 5", "5", 0, 1},
        {"5.", "5", 0, 1},
        {"3\\,000", "3000", 0, 1},
        {"\\left( 1, 2 \\right)", "(1,2)", 0, 1},
        {"\\pi/2", "\\pi / 2", 0, 1},
        {"73", "72", 0, 0},
        {"72.5", "72", 0, 0},
        {"3.1416", "3.14159", 1e-4, 1},
        {"3.15", "3.14159", 1e-4, 0},
        {"1/3", "0.333", 0, 0},
        {"1/3", "0.333", 1e-2, 1},
        {"-5", "5", 0, 0},
        {"1,23", "123", 0, 0}, /* not a thousands separator */
        {"\\frac{1}{0}", "0", 0, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        cr_expect_eq(math_answers_equal(cases[i].got, cases[i].want, cases[i].tol), cases[i].eq, "case %zu: '%s' vs '%s'", i,
                     cases[i].got, cases[i].want);
}

Test(math, plugin_gsm8k_math_r1) {
    reward_set *s = set_from("  - math:\n");
    /* GSM8K: the reference is a worked solution ending in "#### 72" */
    const char *gsm = "{\"answer\": \"Natalia sold 48/2 = 24 clips in May.\\n48+24 = 72\\n#### 72\"}";
    reward_result r = score1(s, "q", "She sold 72 clips in total.\n#### 72", gsm);
    cr_assert_eq(r.status, REWARD_SCORE);
    cr_assert_float_eq(r.score, 1.0, 1e-12);
    r = score1(s, "q", "#### 71", gsm);
    cr_assert_eq(r.status, REWARD_SCORE);
    cr_assert_float_eq(r.score, 0.0, 1e-12);
    /* MATH: a boxed reference */
    r = score1(s, "q", "So $x = \\boxed{\\dfrac{1}{2}}$.", "{\"answer\": \"\\\\boxed{\\\\frac{1}{2}}\"}");
    cr_assert_float_eq(r.score, 1.0, 1e-12, "%s", r.reason);
    /* R1: answer tag, a numeric reference */
    r = score1(s, "q", "<think>6*7</think><answer>42</answer>", "{\"answer\": 42}");
    cr_assert_float_eq(r.score, 1.0, 1e-12, "%s", r.reason);
    /* no answer: unscorable, not 0 */
    r = score1(s, "q", "I don't know.", "{\"answer\": 42}");
    cr_assert_eq(r.status, REWARD_UNSCORABLE);
    cr_assert_str_eq(r.reason, "no final answer");
    /* a row without the answer field is an error naming the field */
    r = score1(s, "q", "#### 3", "{\"solution\": 3}");
    cr_assert_eq(r.status, REWARD_ERROR);
    cr_assert_str_eq(r.reason, "the row has no 'answer' field");
    reward_set_free(s);
}

Test(math, plugin_options) {
    reward_set *s = set_from("  - math:\n      extract: hash\n      answer_field: target\n      tolerance: 0.01\n");
    reward_result r = score1(s, "q", "\\boxed{5} but #### 100.5", "{\"target\": \"100\"}");
    cr_assert_float_eq(r.score, 1.0, 1e-12, "%s", r.reason); /* hash mode ignores the box; 0.5% within 1% */
    r = score1(s, "q", "\\boxed{100}", "{\"target\": \"100\"}");
    cr_assert_eq(r.status, REWARD_UNSCORABLE); /* no #### */
    reward_set_free(s);
}

/* ---- format ------------------------------------------------------------------------------------------ */

Test(format, think_answer) {
    reward_set *s = set_from("  - format:\n");
    static const struct {
        const char *prompt, *c;
        double want;
    } cases[] = {
        {"q", "<think>a</think><answer>b</answer>", 1.0},
        {"q", "  <think>\na\n</think>\n\n<answer> b </answer>\n", 1.0},
        {"q <think>", "a</think><answer>b</answer>", 1.0}, /* R1-Zero template opens the block */
        {"q", "Sure! <think>a</think><answer>b</answer>", 0.5},
        {"q", "<think>a</think> then <answer>b</answer>", 0.5},
        {"q", "<think>a</think><answer>b</answer> bye", 0.5},
        {"q", "<think>a</think><answer>b</answer><answer>c</answer>", 0.5},
        {"q", "<answer>b</answer><think>a</think>", 0.0},
        {"q", "<think>a</think>", 0.0},
        {"q", "just text", 0.0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        reward_result r = score1(s, cases[i].prompt, cases[i].c, NULL);
        cr_expect_eq(r.status, REWARD_SCORE);
        cr_expect_float_eq(r.score, cases[i].want, 1e-12, "case %zu: %g (%s)", i, r.score, r.reason);
    }
    reward_set_free(s);
}

Test(format, answer_tag_and_regex) {
    reward_set *s = set_from("  - format:\n      style: answer_tag\n");
    cr_expect_float_eq(score1(s, "", "x <answer>4</answer>", NULL).score, 1.0, 1e-12);
    cr_expect_float_eq(score1(s, "", "<answer> </answer>", NULL).score, 0.0, 1e-12);
    cr_expect_str_eq(score1(s, "", "<answer> </answer>", NULL).reason, "empty answer");
    cr_expect_float_eq(score1(s, "", "<answer>1</answer><answer>2</answer>", NULL).score, 0.0, 1e-12);
    reward_set_free(s);

    s = set_from("  - format:\n      style: regex\n      pattern: '<think>.+</think>\\s*Answer: -?\\d+'\n");
    cr_expect_float_eq(score1(s, "", "<think>a\nb</think>\nAnswer: -12", NULL).score, 1.0, 1e-12);
    cr_expect_float_eq(score1(s, "", "<think>a</think> Answer: 12 extra", NULL).score, 0.0, 1e-12); /* whole match */
    cr_expect_float_eq(score1(s, "", "\xff\xfe<think>a</think>Answer: 1", NULL).score, 0.0, 1e-12); /* bad UTF-8 */
    reward_set_free(s);

    /* catastrophic backtracking hits the match limit: an error, not a hang */
    s = set_from("  - format:\n      style: regex\n      pattern: '(a+)+b'\n");
    char bomb[64];
    memset(bomb, 'a', 40);
    bomb[40] = '\0';
    reward_result r = score1(s, "", bomb, NULL);
    cr_expect(r.status == REWARD_ERROR || (r.status == REWARD_SCORE && r.score == 0.0), "status %d", r.status);
    reward_set_free(s);
}

Test(format, bad_pattern_is_named) {
    char text[1024];
    snprintf(text, sizeof text, "%srewards:\n  - format:\n      style: regex\n      pattern: 'a(b'\n", BASE);
    recipe *r = NULL;
    mr_err e = {0};
    cr_assert_eq(recipe_load_string(&r, text, "t.yaml", &e), 0, "%s", e.msg);
    cr_assert_eq(recipe_resolve(r, &e), 0, "%s", e.msg);
    reward_set *s = NULL;
    cr_assert_neq(reward_set_init(&s, r, NULL, &e), 0);
    cr_assert_null(s);
    cr_assert(strstr(e.msg, "rewards[0].format.pattern: bad pattern at offset 3"), "%s", e.msg);
    recipe_free(r);
}

Test(format, overlong_penalty) {
    /* DAPO: L_max 100, buffer 20: 0 up to 80, linear to -1 at 100, -1 beyond */
    cr_assert_float_eq(reward_overlong_penalty(50, 100, 20), 0.0, 1e-12);
    cr_assert_float_eq(reward_overlong_penalty(80, 100, 20), 0.0, 1e-12);
    cr_assert_float_eq(reward_overlong_penalty(90, 100, 20), -0.5, 1e-12);
    cr_assert_float_eq(reward_overlong_penalty(100, 100, 20), -1.0, 1e-12);
    cr_assert_float_eq(reward_overlong_penalty(101, 100, 20), -1.0, 1e-12);
    /* as a plugin of the set, from grpo.overlong + rollout.max_new_tokens */
    reward_set *s = set_from("  - format:\ngrpo:\n  overlong:\n    mode: soft_penalty\n    buffer: 20\nrollout:\n"
                             "  max_new_tokens: 100\n");
    cr_assert_eq(reward_set_count(s), 2);
    cr_assert_str_eq(reward_set_plugin(s, 1)->name, "overlong");
    reward_sample smp = {.prompt = "", .completion = "<think>a</think><answer>b</answer>", .tokens = 95};
    reward_result res[2];
    reward_outcome o;
    mr_err e = {0};
    cr_assert_eq(reward_set_score(s, &smp, 1, res, &o, &e), 0);
    cr_assert_float_eq(res[1].score, -0.75, 1e-12);
    cr_assert_float_eq(o.total, 1.0 - 0.75, 1e-12);
    reward_set_free(s);
}

/* ---- toolcall ---------------------------------------------------------------------------------------- */

#define EXPECTED "{\"expected\": {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 3}}}"

Test(toolcall, rubric) {
    reward_set *s = set_from("  - toolcall:\n");
    static const struct {
        const char *c;
        double want;
    } cases[] = {
        {"{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 3}}", 1.0},
        {"Calling: <tool_call>\n{\"name\":\"get_weather\",\n \"arguments\":{\"city\":\"Paris\",\"days\":3}}\n</tool_call>", 1.0},
        {"{\"name\": \"get_weather\", \"arguments\": {\"days\": 3, \"city\": \"Paris\"}}", 0.8},  /* key order */
        {"{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 3.0}}", 0.8}, /* number spelling */
        {"{\"name\": \"get_weather\", \"arguments\": {\"city\": \" Paris \", \"days\": 3}}", 0.8},
        {"{\"function\": {\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Paris\\\", \\\"days\\\": 3}\"}}", 0.8},
        {"<invoke name=\"get_weather\"><parameter name=\"city\">Paris</parameter><parameter name=\"days\">3</parameter></invoke>", 0.8},
        {"<tool_call><name>get_weather</name><arguments><city>Paris</city><days>3</days></arguments></tool_call>", 0.8},
        {"name: get_weather\narguments:\n  city: Paris\n  days: 3\n", 0.8},
        {"{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 4}}", 0.3},
        {"{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}", 0.3},
        {"{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 3, \"units\": \"C\"}}", 0.3},
        {"{\"name\": \"get_time\", \"arguments\": {\"city\": \"Paris\"}}", 0.0},
        {"I would check the weather in Paris.", 0.0},
        {"{not json", 0.0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        reward_result r = score1(s, "", cases[i].c, EXPECTED);
        cr_expect_eq(r.status, REWARD_SCORE, "case %zu: %s", i, r.reason);
        cr_expect_float_eq(r.score, cases[i].want, 1e-12, "case %zu: got %g (%s)", i, r.score, r.reason);
    }
    /* the expected call may be a JSON string in the row */
    reward_result r = score1(s, "", "{\"name\":\"f\",\"arguments\":{\"a\":1}}",
                             "{\"expected\": \"{\\\"name\\\": \\\"f\\\", \\\"arguments\\\": {\\\"a\\\": 1}}\"}");
    cr_expect_float_eq(r.score, 1.0, 1e-12, "%s", r.reason);
    /* no expected call and no schema: unscorable; a malformed expected call: error */
    cr_expect_eq(score1(s, "", "{}", "{\"x\": 1}").status, REWARD_UNSCORABLE);
    r = score1(s, "", "{}", "{\"expected\": {\"arguments\": {}}}");
    cr_expect_eq(r.status, REWARD_ERROR);
    cr_expect_str_eq(r.reason, "the row's 'expected' is not a call {name, arguments}");
    reward_set_free(s);
}

Test(toolcall, format_option_restricts) {
    reward_set *s = set_from("  - toolcall:\n      format: xml\n");
    /* JSON is not read in xml mode */
    cr_expect_float_eq(score1(s, "", "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 3}}",
                              EXPECTED).score, 0.0, 1e-12);
    reward_set_free(s);
}

Test(toolcall, structured_output_schema) {
    reward_set *s = set_from("  - toolcall:\n");
    const char *row = "{\"schema\": {\"type\": \"object\", \"required\": [\"name\", \"tags\"], \"properties\": {"
                      "\"name\": {\"type\": \"string\"}, \"age\": {\"type\": \"integer\"},"
                      "\"tags\": {\"type\": \"array\", \"items\": {\"enum\": [\"a\", \"b\"]}}}}}";
    reward_result r = score1(s, "", "Here: {\"name\": \"x\", \"age\": 3, \"tags\": [\"a\", \"b\"]}", row);
    cr_expect_float_eq(r.score, 1.0, 1e-12, "%s", r.reason);
    r = score1(s, "", "{\"name\": \"x\", \"age\": 3.5, \"tags\": []}", row);
    cr_expect_float_eq(r.score, 0.0, 1e-12);
    cr_expect_str_eq(r.reason, "$.age: expected integer");
    r = score1(s, "", "{\"name\": \"x\"}", row);
    cr_expect_str_eq(r.reason, "$: missing required 'tags'");
    r = score1(s, "", "{\"name\": \"x\", \"tags\": [\"a\", \"c\"]}", row);
    cr_expect_str_eq(r.reason, "$.tags[1]: not one of the enum values");
    r = score1(s, "", "no json here", row);
    cr_expect_str_eq(r.reason, "no JSON output");
    reward_set_free(s);
}
