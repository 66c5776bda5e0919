/* recipe.h: the recipe YAML that drives every moerl job, read against a typed schema.
 *
 * A recipe is a mapping of sections (run, model, tokenizer, data, optim, sft, rollout, grpo, rewards). Each
 * field has a dotted path, a type, a default (or is required), a range and a one-line doc; the tables live in
 * core/recipe_schema.c and `moerl recipe --schema` prints them. The life of a recipe:
 *
 *     recipe *r; mr_err e;
 *     recipe_load(&r, "recipes/quickstart.yaml", &e);     types, ranges, unknown and duplicate keys
 *     recipe_set(r, "grpo.num_generations=16", &e);       CLI overrides (--set), validated the same way
 *     recipe_resolve(r, &e);                              defaults, required keys, cross-field checks
 *     recipe_int(r, "grpo.num_generations");               typed getters by dotted path
 *     recipe_dump_yaml(r, &text);                          the resolved recipe, printed and stored per run
 *     recipe_free(r);
 *
 * Errors name the place and the field: `recipes/x.yaml:21:7: rewards[1].weight: expected a number, got "high"`
 * (lines and columns 1-based), or `--set grpo.mu=0: grpo.mu: expected an integer >= 1, got "0"` for overrides.
 *
 * null in a file means "not given" (the default applies), except for a mapping-typed field, where it means
 * "present with every option at its default" (so `- math:` in rewards is a math plugin). In --set, an empty
 * value (`key=`) removes the field (a list item with it), whatever its type.
 *
 * Owns: the recipe and every string it returns (valid until the next recipe_set or recipe_free). */
#ifndef MOERL_RECIPE_H
#define MOERL_RECIPE_H

#include <stddef.h>
#include <stdint.h>

#include "core/err.h"

/* ---- schema ---------------------------------------------------------------------------------------- */

typedef enum {
    RT_INT,     /* 64-bit signed integer */
    RT_FLOAT,   /* finite double; integers are accepted */
    RT_BOOL,    /* true / false */
    RT_STRING,  /* any scalar, kept as text */
    RT_ENUM,    /* one of values[] */
    RT_LIST,    /* a list of scalars of type item */
    RT_OBJECT,  /* a nested mapping with its own fields */
    RT_OBJLIST  /* a list of mappings, each with fields */
} recipe_type;

enum {
    RF_REQUIRED = 1u << 0,  /* no default: the key must be given */
    RF_MIN = 1u << 1,       /* numbers (and list items): value >= min */
    RF_MAX = 1u << 2,       /* value <= max */
    RF_MIN_EXCL = 1u << 3,  /* with RF_MIN: value > min */
    RF_MAX_EXCL = 1u << 4,  /* with RF_MAX: value < max */
    RF_ONEOF = 1u << 5,     /* member of its object's one-of group (at most one member set) */
    RF_ONEOF_REQ = 1u << 6, /* on an object: exactly one member of its one-of group must be set */
    RF_SHORTHAND = 1u << 7  /* a scalar written for the parent object sets this field (`lua: x.lua`) */
};

typedef struct recipe_field {
    const char *key;
    recipe_type type;
    recipe_type item;                   /* RT_LIST: the type of the items */
    const char *def;                    /* default as YAML text ("0.2", "[0.9, 0.95]"); NULL: none */
    unsigned flags;                     /* RF_* */
    double min, max;                    /* with RF_MIN / RF_MAX */
    const char *const *values;          /* RT_ENUM: allowed values, NULL-terminated */
    const struct recipe_field *fields;  /* RT_OBJECT / RT_OBJLIST: children, ended by a NULL key */
    size_t min_items, max_items;        /* lists: item count bounds (max_items 0 = unbounded) */
    const char *doc;                    /* one line */
} recipe_field;

/* The sections, in order (core/recipe_schema.c), ended by a NULL key. */
extern const recipe_field recipe_schema[];

/* What a field expects, as text: "an integer >= 2", "one of group, batch, none", "a list of 2 numbers >= 0
 * and < 1" (item != 0: an item of the list field f). Messages and the reference use it. */
void recipe_field_describe(const recipe_field *f, int item, char *buf, size_t cap);

/* Every field with its type, default, range and doc, as text for `moerl recipe --schema`. *out is freed
 * with mem_free. Returns 0 or MR_ENOMEM. */
int recipe_schema_doc(char **out);

/* ---- recipes --------------------------------------------------------------------------------------- */

typedef struct recipe recipe;

/* Reads and validates a recipe file (types, ranges, unknown and duplicate keys). *out = NULL on error. */
int recipe_load(recipe **out, const char *path, mr_err *e);
/* The same from NUL-terminated text; source_name is used in messages (NULL: "<string>"). */
int recipe_load_string(recipe **out, const char *text, const char *source_name, mr_err *e);
/* One override "section.key=value" (also "rewards[1].weight=2", "rollout.stop=[a, b]", "rewards[2].lua=x.lua"
 * where index 2 == length appends). The value is read as a YAML scalar or flow collection; a string field
 * takes text that is not valid YAML verbatim. On error the recipe is unchanged. */
int recipe_set(recipe *r, const char *assignment, mr_err *e);
/* Fills defaults, checks required keys, one-of groups and cross-field constraints. Idempotent. */
int recipe_resolve(recipe *r, mr_err *e);
/* The recipe as YAML, every field in schema order (after recipe_resolve: the resolved recipe, defaults
 * included; unset optional fields as null, unset optional mappings left out). It loads back to the same
 * recipe. *out is freed with mem_free. Returns 0 or MR_ENOMEM. */
int recipe_dump_yaml(const recipe *r, char **out);
void recipe_free(recipe *r); /* accepts NULL */

/* The file (or source name) the recipe was read from. */
const char *recipe_source(const recipe *r);

/* Typed getters by dotted path: "grpo.mu", "grpo.dynamic_sampling.enabled", "rewards[1].weight",
 * "rollout.stop[0]". A path that is not in the schema, or a getter of the wrong type, is a programmer error
 * (assert; 0 / NULL without asserts). Unset optional fields read as 0, 0.0, false, NULL. */
int recipe_is_set(const recipe *r, const char *path);
int64_t recipe_int(const recipe *r, const char *path);
double recipe_float(const recipe *r, const char *path);
int recipe_bool(const recipe *r, const char *path);
const char *recipe_str(const recipe *r, const char *path); /* RT_STRING or RT_ENUM (the value's name) */
int recipe_enum(const recipe *r, const char *path);        /* index in the field's values, -1 when unset */
size_t recipe_list_len(const recipe *r, const char *path); /* RT_LIST / RT_OBJLIST; 0 when unset */
/* The member of the object's one-of group that is set ("math" for "rewards[0]", "preset" for "model"). */
const char *recipe_oneof(const recipe *r, const char *path);

#endif
