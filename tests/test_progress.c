/* test_progress.c: the progress line's text (rate, ETA, bar) for known inputs. */
#include <criterion/criterion.h>
#include <string.h>

#include "core/progress.h"

Test(progress, hms) {
    char b[32];
    progress_hms(b, sizeof b, 0);
    cr_expect_str_eq(b, "00:00");
    progress_hms(b, sizeof b, 125.4);
    cr_expect_str_eq(b, "02:05");
    progress_hms(b, sizeof b, 3723);
    cr_expect_str_eq(b, "1:02:03");
    progress_hms(b, sizeof b, -1);
    cr_expect_str_eq(b, "--:--");
}

Test(progress, plain_line_with_rate_and_eta) {
    char b[256];
    progress_format(b, sizeof b, "sft", "steps", 25, 100, 50.0, 0, "loss 2.500");
    cr_expect_str_eq(b, "sft: 25/100 steps (25%) 0.5 steps/s elapsed 00:50 ETA 02:30 | loss 2.500");
}

Test(progress, bar_and_unknown_total) {
    char b[256];
    progress_format(b, sizeof b, "x", "it", 5, 10, 1.0, 10, NULL);
    cr_expect_str_eq(b, "x: [=====>    ] 5/10 it (50%) 5 it/s elapsed 00:01 ETA 00:01");
    progress_format(b, sizeof b, "gen", "tok", 7, 0, 0.0, 0, "");
    cr_expect_str_eq(b, "gen: 7 tok 0 tok/s elapsed 00:00");
}
