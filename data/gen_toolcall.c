/* gen_toolcall.c: tool calls in the spirit of the "Tool Calling Accuracy" benchmark: a natural-language request
 * and the one structured call that serves it, {"name": TOOL, "arguments": {...}} (the completion, compact JSON).
 * Tools: bash {command}; file operations read_file {path}, write_file {path, content}, list_dir {path, recursive?};
 * and JSON generation against a schema given in the prompt (create_contact, create_event, add_product,
 * report_weather). Every row carries the tool name and the JSON Schema of its arguments.
 * Difficulty: 1 plain shell commands, read and list; 2 adds flags, write_file, recursive listing and the JSON
 * tools; 3 adds pipelines and optional schema fields. Templates have several phrasings; values come from pools. */
#include <stdio.h>
#include <string.h>

#include "data/gen_internal.h"

static const char *const schema_of[][2] = {
    {"bash", "{\"type\":\"object\",\"properties\":{\"command\":{\"type\":\"string\"}},\"required\":[\"command\"]}"},
    {"read_file", "{\"type\":\"object\",\"properties\":{\"path\":{\"type\":\"string\"}},\"required\":[\"path\"]}"},
    {"write_file", "{\"type\":\"object\",\"properties\":{\"path\":{\"type\":\"string\"},\"content\":{\"type\":"
                   "\"string\"}},\"required\":[\"path\",\"content\"]}"},
    {"list_dir", "{\"type\":\"object\",\"properties\":{\"path\":{\"type\":\"string\"},\"recursive\":{\"type\":"
                 "\"boolean\"}},\"required\":[\"path\"]}"},
    {"create_contact", "{\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"string\"},\"age\":{\"type\":"
                       "\"integer\"},\"email\":{\"type\":\"string\"}},\"required\":[\"name\",\"age\",\"email\"]}"},
    {"create_event", "{\"type\":\"object\",\"properties\":{\"title\":{\"type\":\"string\"},\"date\":{\"type\":"
                     "\"string\"},\"time\":{\"type\":\"string\"},\"attendees\":{\"type\":\"array\",\"items\":{"
                     "\"type\":\"string\"}}},\"required\":[\"title\",\"date\",\"attendees\"]}"},
    {"add_product", "{\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"string\"},\"price\":{\"type\":"
                    "\"number\"},\"in_stock\":{\"type\":\"boolean\"},\"quantity\":{\"type\":\"integer\"}},"
                    "\"required\":[\"name\",\"price\",\"in_stock\"]}"},
    {"report_weather", "{\"type\":\"object\",\"properties\":{\"city\":{\"type\":\"string\"},\"temperature_c\":{"
                       "\"type\":\"integer\"},\"condition\":{\"type\":\"string\",\"enum\":[\"sunny\",\"cloudy\","
                       "\"rain\",\"snow\"]}},\"required\":[\"city\",\"temperature_c\",\"condition\"]}"},
};

static const char *schema_text(const char *tool) {
    for (size_t i = 0; i < sizeof schema_of / sizeof schema_of[0]; i++)
        if (!strcmp(schema_of[i][0], tool)) return schema_of[i][1];
    return NULL;
}

/* ---- value pools ---- */

#define POOL(a) (a), (int)(sizeof(a) / sizeof((a)[0]))
static const char *const dirs[] = {"/var/log", "/tmp",   "/home/alice/projects", "src",  "build",
                                   "/etc/nginx", "data/raw", "docs", "/opt/app", "tests"};
static const char *const files[] = {"notes.txt",  "config.yaml", "main.py",          "README.md",
                                    "app.log",    "report.csv",  "index.html",       "server.js",
                                    "access.log", "Makefile",    "requirements.txt", "data.json"};
static const char *const pats[] = {"ERROR", "TODO", "import", "timeout", "404", "warning", "user_id", "failed"};
static const char *const exts[] = {"py", "txt", "log", "json", "md", "c", "csv", "yaml"};
static const char *const names[] = {"backup", "archive", "output", "cache", "release", "old", "new_data", "logs_2024"};
static const char *const texts[] = {"hello world", "TODO: fix the login bug", "version=1.4.2",
                                    "meeting moved to Friday", "done", "retry=3"};
static const char *const firsts[] = {"Alice", "Bob", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Jun"};
static const char *const lasts[] = {"Smith", "Garcia", "Ito", "Novak", "Okafor", "Rossi", "Kim", "Silva", "Weber"};
static const char *const titles[] = {"Team sync", "Design review", "Lunch", "Sprint planning", "1:1", "Demo day"};
static const char *const products[] = {"USB-C cable", "Desk lamp", "Coffee mug", "Notebook", "Headphones", "Backpack"};
static const char *const cities[] = {"Paris", "Lagos", "Tokyo", "Lima", "Oslo", "Cairo", "Denver", "Hanoi"};
static const char *const conditions[] = {"sunny", "cloudy", "rain", "snow"};

static const char *pick(rng *r, const char *const *pool, int n) { return pool[rng_below(r, (uint32_t)n)]; }

/* The values one row's templates may use. */
typedef struct vals {
    const char *dir, *file, *pat, *ext, *name, *text;
    char path[256];
    int n;
} vals;

/* Copies tmpl into out with {dir} {file} {path} {pat} {ext} {name} {text} {n} replaced. */
static void subst(gen_str *out, const char *tmpl, const vals *v) {
    static const char *const keys[] = {"{dir}", "{file}", "{path}", "{pat}", "{ext}", "{name}", "{text}", "{n}"};
    const char *reps[] = {v->dir, v->file, v->path, v->pat, v->ext, v->name, v->text};
    char num[16];
    snprintf(num, sizeof num, "%d", v->n);
    for (const char *p = tmpl; *p;) {
        int k = 0;
        while (k < 8 && strncmp(p, keys[k], strlen(keys[k]))) k++;
        if (k < 8) {
            gen_str_add(out, "%s", k == 7 ? num : reps[k]);
            p += strlen(keys[k]);
        } else {
            gen_str_add(out, "%c", *p++);
        }
    }
}

/* ---- templates: bash commands and file operations ---- */

typedef struct tmpl {
    int min_d;
    const char *tool;        /* "bash", "read_file", "write_file", "list_dir" */
    const char *phrasing[3]; /* NULL-terminated when fewer */
    const char *command;     /* bash: the command; others: unused */
    int recursive;           /* list_dir: adds "recursive": true */
} tmpl;

static const tmpl templates[] = {
    {1, "bash", {"List all files in {dir}, including hidden ones, with details.",
                 "Show a detailed listing of {dir} with hidden files.", NULL}, "ls -la {dir}", 0},
    {1, "bash", {"How many lines are in {path}?", "Count the lines of {path}.", NULL}, "wc -l {path}", 0},
    {1, "bash", {"Find all .{ext} files under {dir}.", "Search {dir} recursively for files ending in .{ext}.", NULL},
     "find {dir} -name '*.{ext}'", 0},
    {1, "bash", {"Search {path} for lines containing \"{pat}\" and show line numbers.",
                 "Show the lines of {path} that contain {pat}, with line numbers.", NULL}, "grep -n '{pat}' {path}", 0},
    {1, "bash", {"Show the first {n} lines of {path}.", "Print the top {n} lines of {path}.", NULL},
     "head -n {n} {path}", 0},
    {1, "bash", {"Show the last {n} lines of {path}.", "Print the final {n} lines of {path}.", NULL},
     "tail -n {n} {path}", 0},
    {1, "bash", {"How much disk space does {dir} use in total? Human-readable, please.",
                 "Give the total size of {dir} in human-readable form.", NULL}, "du -sh {dir}", 0},
    {1, "bash", {"Create the directory {dir}/{name}, including any missing parents.",
                 "Make a folder {dir}/{name} (create parents as needed).", NULL}, "mkdir -p {dir}/{name}", 0},
    {1, "read_file", {"Open {path} and show me its contents.", "Read the file {path}.", "What does {path} say?"},
     NULL, 0},
    {1, "list_dir", {"What files are in {dir}?", "List the contents of the folder {dir}.", NULL}, NULL, 0},
    {2, "bash", {"Compress {dir} into {name}.tar.gz.", "Make a gzipped tarball {name}.tar.gz of {dir}.", NULL},
     "tar -czf {name}.tar.gz {dir}", 0},
    {2, "bash", {"Copy the directory {dir} to {name}, with everything in it.", "Recursively copy {dir} to {name}.",
                 NULL}, "cp -r {dir} {name}", 0},
    {2, "bash", {"Search every file under {dir} for \"{pat}\", ignoring case.",
                 "Find {pat} in any file below {dir}, case-insensitively.", NULL}, "grep -ri '{pat}' {dir}", 0},
    {2, "list_dir", {"List everything under {dir}, recursively.", "Show all files in {dir} and its subfolders.", NULL},
     NULL, 1},
    {2, "write_file", {"Write \"{text}\" to {path}.", "Save the text \"{text}\" in {path}.", NULL}, NULL, 0},
    {3, "bash", {"Count the unique lines in {path}.", "How many distinct lines does {path} have?", NULL},
     "sort {path} | uniq | wc -l", 0},
    {3, "bash", {"Show the {n} most frequent lines in {path}.", "Which {n} lines occur most often in {path}?", NULL},
     "sort {path} | uniq -c | sort -rn | head -n {n}", 0},
    {3, "bash", {"How many lines of {path} contain \"{pat}\"?", "Count the lines in {path} that mention {pat}.", NULL},
     "grep -c '{pat}' {path}", 0},
    {3, "bash", {"List the {n} largest files in {dir}.", "Which {n} files in {dir} are biggest?", NULL},
     "ls -S {dir} | head -n {n}", 0},
};
#define NTEMPLATES ((int)(sizeof templates / sizeof templates[0]))
#define NJSON 4 /* the JSON-generation tools, difficulty >= 2 */

static int add_ok(cJSON *x) { return x != NULL; }

/* Builds prompt, tool and arguments from template t. */
static int from_template(const tmpl *t, rng *r, gen_str *prompt, cJSON *args) {
    vals v = {0};
    v.dir = pick(r, POOL(dirs));
    v.file = pick(r, POOL(files));
    v.pat = pick(r, POOL(pats));
    v.ext = pick(r, POOL(exts));
    v.name = pick(r, POOL(names));
    v.text = pick(r, POOL(texts));
    v.n = (int)gen_between(r, 3, 50);
    /* a bare file name half the time, else inside one of the directories */
    if (rng_below(r, 2)) snprintf(v.path, sizeof v.path, "%s", v.file);
    else snprintf(v.path, sizeof v.path, "%s/%s", v.dir, v.file);
    int nphr = t->phrasing[2] ? 3 : t->phrasing[1] ? 2 : 1;
    subst(prompt, t->phrasing[rng_below(r, (uint32_t)nphr)], &v);
    if (!strcmp(t->tool, "bash")) {
        gen_str cmd = {0};
        subst(&cmd, t->command, &v);
        return !cmd.full && add_ok(cJSON_AddStringToObject(args, "command", cmd.s));
    }
    if (!strcmp(t->tool, "read_file")) return add_ok(cJSON_AddStringToObject(args, "path", v.path));
    if (!strcmp(t->tool, "write_file"))
        return add_ok(cJSON_AddStringToObject(args, "path", v.path)) &&
               add_ok(cJSON_AddStringToObject(args, "content", v.text));
    /* list_dir */
    return add_ok(cJSON_AddStringToObject(args, "path", v.dir)) &&
           (!t->recursive || add_ok(cJSON_AddTrueToObject(args, "recursive")));
}

/* ---- JSON generation against a schema ---- */

static int json_contact(rng *r, gen_str *desc, cJSON *args) {
    const char *f = pick(r, POOL(firsts)), *l = pick(r, POOL(lasts));
    int age = (int)gen_between(r, 18, 90);
    char name[64], email[96];
    snprintf(name, sizeof name, "%s %s", f, l);
    snprintf(email, sizeof email, "%c%s@example.com", f[0] + ('a' - 'A'), l);
    for (char *p = email; *p; p++)
        if (*p >= 'A' && *p <= 'Z') *p = (char)(*p + ('a' - 'A'));
    if (rng_below(r, 2)) gen_str_add(desc, "Add a contact: %s, %d years old, email %s.", name, age, email);
    else gen_str_add(desc, "Save %s (age %d, %s) as a new contact.", name, age, email);
    return add_ok(cJSON_AddStringToObject(args, "name", name)) && add_ok(cJSON_AddNumberToObject(args, "age", age)) &&
           add_ok(cJSON_AddStringToObject(args, "email", email));
}

static int json_event(rng *r, int d, gen_str *desc, cJSON *args) {
    const char *title = pick(r, POOL(titles));
    char date[16], time[8];
    snprintf(date, sizeof date, "2025-%02d-%02d", (int)gen_between(r, 1, 12), (int)gen_between(r, 1, 28));
    snprintf(time, sizeof time, "%02d:%s", (int)gen_between(r, 8, 17), rng_below(r, 2) ? "30" : "00");
    int na = (int)gen_between(r, 1, 3);
    const char *who[3];
    for (int i = 0; i < na; i++) {
        int again;
        do { /* distinct attendees */
            who[i] = pick(r, POOL(firsts));
            again = 0;
            for (int j = 0; j < i; j++) again |= who[j] == who[i];
        } while (again);
    }
    int with_time = d >= 3 && rng_below(r, 2);
    gen_str list = {0};
    for (int i = 0; i < na; i++) gen_str_add(&list, "%s%s", i == 0 ? "" : i == na - 1 ? " and " : ", ", who[i]);
    gen_str_add(desc, "Schedule \"%s\" on %s", title, date);
    if (with_time) gen_str_add(desc, " at %s", time);
    gen_str_add(desc, " with %s.", list.s);
    cJSON *att;
    int ok = add_ok(cJSON_AddStringToObject(args, "title", title)) &&
             add_ok(cJSON_AddStringToObject(args, "date", date)) &&
             (!with_time || add_ok(cJSON_AddStringToObject(args, "time", time))) &&
             add_ok(att = cJSON_AddArrayToObject(args, "attendees"));
    for (int i = 0; i < na && ok; i++) {
        cJSON *s = cJSON_CreateString(who[i]);
        ok = s && cJSON_AddItemToArray(att, s);
    }
    return ok;
}

static int json_product(rng *r, int d, gen_str *desc, cJSON *args) {
    const char *name = pick(r, POOL(products));
    int cents = (int)gen_between(r, 199, 19999);
    cents -= cents % 100 == 0 ? 1 : 0;
    int in_stock = (int)rng_below(r, 2);
    int with_qty = d >= 3 && in_stock && rng_below(r, 2);
    int qty = (int)gen_between(r, 1, 500);
    gen_str_add(desc, "Add the product %s at $%d.%02d, %s", name, cents / 100, cents % 100,
                in_stock ? "in stock" : "out of stock");
    if (with_qty) gen_str_add(desc, " (%d units)", qty);
    gen_str_add(desc, ".");
    return add_ok(cJSON_AddStringToObject(args, "name", name)) &&
           add_ok(cJSON_AddNumberToObject(args, "price", cents / 100.0)) &&
           add_ok(cJSON_AddBoolToObject(args, "in_stock", in_stock)) &&
           (!with_qty || add_ok(cJSON_AddNumberToObject(args, "quantity", qty)));
}

static int json_weather(rng *r, gen_str *desc, cJSON *args) {
    const char *city = pick(r, POOL(cities)), *cond = pick(r, POOL(conditions));
    int t = (int)gen_between(r, -15, 40);
    if (!strcmp(cond, "snow") && t > 2) t = -t / 4; /* keep the weather plausible */
    gen_str_add(desc, "Report the weather in %s: %d degrees C, %s.", city, t, cond);
    return add_ok(cJSON_AddStringToObject(args, "city", city)) &&
           add_ok(cJSON_AddNumberToObject(args, "temperature_c", t)) &&
           add_ok(cJSON_AddStringToObject(args, "condition", cond));
}

int gen_toolcall_row(const gen_opts *o, rng *r, cJSON *row, mr_err *e) {
    int d = o->difficulty;
    int avail = 0;
    for (int i = 0; i < NTEMPLATES; i++) avail += templates[i].min_d <= d;
    int njson = d >= 2 ? NJSON : 0;
    int k = (int)rng_below(r, (uint32_t)(avail + njson));
    gen_str prompt = {0};
    const char *tool = NULL;
    cJSON *call = cJSON_CreateObject(), *args = NULL;
    int ok = call != NULL;
    if (ok && k < avail) {
        const tmpl *t = NULL;
        for (int i = 0, seen = 0; i < NTEMPLATES && !t; i++)
            if (templates[i].min_d <= d && seen++ == k) t = &templates[i];
        tool = t->tool;
        ok = add_ok(cJSON_AddStringToObject(call, "name", tool)) &&
             add_ok(args = cJSON_AddObjectToObject(call, "arguments")) && from_template(t, r, &prompt, args);
    } else if (ok) {
        static const char *const json_tools[NJSON] = {"create_contact", "create_event", "add_product",
                                                      "report_weather"};
        int j = k - avail;
        tool = json_tools[j];
        gen_str desc = {0};
        ok = add_ok(cJSON_AddStringToObject(call, "name", tool)) &&
             add_ok(args = cJSON_AddObjectToObject(call, "arguments"));
        if (ok) {
            switch (j) {
            case 0: ok = json_contact(r, &desc, args); break;
            case 1: ok = json_event(r, d, &desc, args); break;
            case 2: ok = json_product(r, d, &desc, args); break;
            default: ok = json_weather(r, &desc, args); break;
            }
        }
        gen_str_add(&prompt, "%s Call %s; its arguments follow this JSON schema: %s", desc.s, tool,
                    schema_text(tool));
        ok = ok && !desc.full;
    }
    char *completion = ok ? cJSON_PrintUnformatted(call) : NULL;
    cJSON_Delete(call);
    cJSON *schema = completion ? cJSON_Parse(schema_text(tool)) : NULL;
    ok = schema && !prompt.full && add_ok(cJSON_AddStringToObject(row, "prompt", prompt.s)) &&
         add_ok(cJSON_AddStringToObject(row, "completion", completion)) &&
         add_ok(cJSON_AddStringToObject(row, "tool", tool));
    if (ok) {
        cJSON_AddItemToObject(row, "schema", schema);
        schema = NULL;
        ok = add_ok(cJSON_AddStringToObject(row, "task", "toolcall")) &&
             add_ok(cJSON_AddNumberToObject(row, "difficulty", d));
    }
    cJSON_Delete(schema);
    cJSON_free(completion);
    if (!ok) return err_set(e, prompt.full ? MR_EINTERNAL : MR_ENOMEM, "cannot build a toolcall row%s",
                            prompt.full ? ": prompt too long" : ": out of memory");
    return MR_OK;
}
