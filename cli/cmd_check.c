/* PLACEHOLDER, replaced by the module's owner before any commit. */
#include <stdio.h>
#include "cli/cli.h"
int cmd_check(int argc, char **argv) { (void)argc; (void)argv; fprintf(stderr, "moerl check: not built yet\n"); return 1; }
