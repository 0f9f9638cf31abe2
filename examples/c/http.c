/*
 * Joins the mesh from a YAML (or JSON) config file and makes one HTTP
 * request over mTLS through it, with nasp's C ABI (include/nasp.h).
 *
 *   http CONFIG_FILE URL
 *
 * Prints the workload's SPIFFE id, the response's status, the server's
 * verified id (mTLS), each response header and the body (read in 1 KiB
 * chunks), then frees everything and exits 0; on a failure it prints the
 * call, its status and nasp_last_error() and exits 1.
 *
 * Build (docs/ffi-design.md, section 7.2; the test is
 * crates/nasp-ffi/tests/c_example.rs):
 *   cc -std=c11 -Wall -Wextra -Werror -pedantic -Icrates/nasp-ffi/include \
 *      examples/c/http.c -Ltarget/debug -lnasp_ffi \
 *      -Wl,-rpath,$PWD/target/debug -o http
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nasp.h"

/* Prints what failed with the library's message; returns 0 so that a
 * caller writes `if (!check(...)) goto out;`. */
static int check(NaspStatus s, const char *what) {
    if (s == NASP_STATUS_OK) {
        return 1;
    }
    char msg[512];
    nasp_last_error(msg, sizeof msg);
    fprintf(stderr, "%s: status %d: %s\n", what, (int)s, msg);
    return 0;
}

/* The whole file, NUL-terminated, in *len bytes (without the NUL); free()
 * it. NULL when it cannot be read. */
static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        return NULL;
    }
    char *text = NULL;
    size_t cap = 0;
    *len = 0;
    for (;;) {
        if (*len + 4096 + 1 > cap) {
            cap = cap * 2 + 4096 + 1;
            char *grown = realloc(text, cap);
            if (grown == NULL) {
                free(text);
                fclose(f);
                return NULL;
            }
            text = grown;
        }
        size_t n = fread(text + *len, 1, 4096, f);
        *len += n;
        if (n < 4096) {
            break;
        }
    }
    int failed = ferror(f);
    fclose(f);
    if (failed) {
        free(text);
        return NULL;
    }
    text[*len] = '\0';
    return text;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s CONFIG_FILE URL\n", argv[0]);
        return 2;
    }
    size_t config_len = 0;
    char *config = read_file(argv[1], &config_len);
    if (config == NULL) {
        fprintf(stderr, "cannot read %s\n", argv[1]);
        return 1;
    }

    int ok = 0;
    NaspMesh mesh = {0};
    NaspResponse resp = {0};

    /* Blocks until the mesh has a certificate and a first xDS snapshot. */
    if (!check(nasp_mesh_new(config, config_len, &mesh), "nasp_mesh_new")) {
        goto out;
    }
    NaspStr id;
    if (!check(nasp_mesh_id(mesh, &id), "nasp_mesh_id")) {
        goto out;
    }
    printf("id %.*s\n", (int)id.len, id.ptr);

    /* Routing, mTLS and the filters are the mesh's: the URL names the
     * service, not an address. */
    const char *body = "hello from C";
    NaspHeader headers[] = {
        {"content-type", strlen("content-type"), "text/plain", strlen("text/plain")},
    };
    if (!check(nasp_http_request(mesh, "POST", argv[2], headers, 1, (const uint8_t *)body,
                                 strlen(body), 0, &resp),
               "nasp_http_request")) {
        goto out;
    }

    uint16_t status = 0;
    NaspStr peer;
    size_t n_headers = 0;
    if (!check(nasp_response_status(resp, &status), "nasp_response_status") ||
        !check(nasp_response_peer_id(resp, &peer), "nasp_response_peer_id") ||
        !check(nasp_response_header_count(resp, &n_headers), "nasp_response_header_count")) {
        goto out;
    }
    printf("status %u\n", (unsigned)status);
    printf("peer %.*s\n", (int)peer.len, peer.ptr);
    for (size_t i = 0; i < n_headers; i++) {
        NaspStr name, value;
        if (!check(nasp_response_header_at(resp, i, &name, &value), "nasp_response_header_at")) {
            goto out;
        }
        printf("header %.*s: %.*s\n", (int)name.len, name.ptr, (int)value.len, value.ptr);
    }

    /* The body in chunks; n == 0 is its end. */
    printf("body ");
    uint8_t chunk[1024];
    for (;;) {
        size_t n = 0;
        if (!check(nasp_response_read(resp, chunk, sizeof chunk, &n, 0), "nasp_response_read")) {
            goto out;
        }
        if (n == 0) {
            break;
        }
        fwrite(chunk, 1, n, stdout);
    }
    printf("\n");
    ok = 1;

out:
    /* Only what was created is freed; the response before its mesh. */
    if (resp.id != 0) {
        check(nasp_response_free(resp), "nasp_response_free");
    }
    if (mesh.id != 0) {
        check(nasp_mesh_free(mesh), "nasp_mesh_free");
    }
    free(config);
    return ok ? 0 : 1;
}
