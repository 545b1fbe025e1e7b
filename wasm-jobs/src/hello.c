/* hello.wasm: prints "hello from wasm, args=A B NAME=VALUE". Exercises a host's
 * WASI args and environ: argv[0] (the program name, chosen by the host) is left
 * out so the output depends only on the job's own args and env. */
#include <stdlib.h>

#include "out.h"

int main(int argc, char **argv) {
    const char *name = getenv("NAME");
    put_str(1, "hello from wasm, args=");
    for (int i = 1; i < argc; i++) {
        if (i > 1) put_str(1, " ");
        put_str(1, argv[i]);
    }
    put_str(1, " NAME=");
    put_str(1, name ? name : "");
    put_str(1, "\n");
    return 0;
}
